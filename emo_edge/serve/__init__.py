"""`emo-edge serve`: an OpenAI-compatible local server that picks the expert pool per request.

```
 HTTP (app.py, Starlette) ──validate (openai_schema.py), build job (generation.py)──▶ Scheduler (scheduler.py)
   one worker thread owning the engine (emo_edge.engine) ──use(pool), generate──▶ events ──▶ JSON / SSE
 /metrics (metrics.py, Prometheus text)     / (static/index.html, the chat page)
```
"""
