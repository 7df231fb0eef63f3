"""The planner: precision, layout and experts to fit a budget (search), the byte arithmetic it and the runtime share (sizing), and the plan's table (table)."""
