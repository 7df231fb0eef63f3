"""The short fuzz run (issue 14 item 12): every loader of hostile input gets a deterministic batch of hypothesis
mutants (derandomized), run in a watchdogged worker under an audit hook. No mutant may crash (an exception that
is not an EmoEdgeError, or a dead worker), hang, or make the loader open a file outside its input directory.
The long campaign is `python bench/fuzz.py --iterations 100000 --out DIR` (tests/fuzz/__init__.py).

About 40 s on 2 cores when they are free (~10 s build the base inputs: synth + two exports; ~1,200 iterations),
up to ~90 s when other work shares them."""

from __future__ import annotations

import pytest

from fuzz.harness import Campaign
from fuzz.targets import SELF_TEST, TARGET_LIST

# iterations per target in the short run: cheap parsers, static-bundle loaders, swappable-bundle loaders
SHORT = {"cheap": 120, "static": 30, "swap": 8}


def _budget(t) -> int:
    return SHORT["swap"] if t.home else SHORT["static"] if t.e2e else SHORT["cheap"]


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    camp = Campaign(tmp_path_factory.mktemp("fuzz"), cpu=None)
    yield camp
    camp.close()


def test_harness_classifies_what_it_is_shown(campaign):
    """The harness itself: a typed refusal, a crash, a hang, a dead worker and a read of a decoy outside the
    input are each seen as such (so 0 findings below means something)."""
    seen = {}
    for how in (b"typed", b"crash", b"hang", b"outside", b"die"):
        seen[how] = campaign.worker.run(SELF_TEST, {"files": {"pool.json": how}})
    assert seen[b"typed"]["outcome"] == "typed" and not seen[b"typed"]["outside"]
    assert seen[b"crash"]["outcome"] == "crash" and seen[b"crash"]["where"].endswith("in _selftest")
    assert seen[b"hang"]["outcome"] == "hang"
    assert seen[b"die"]["outcome"] == "crash" and "exit code 3" in seen[b"die"]["error"]
    assert seen[b"outside"]["outcome"] == "accepted"
    assert seen[b"outside"]["outside"] == [f"open {campaign.work / 'decoy' / 'pool.json'}"]


@pytest.mark.parametrize("target", TARGET_LIST, ids=lambda t: t.name)
def test_short_fuzz(campaign, target):
    base = campaign.check_base(target)
    assert base["outcome"] == "accepted" and not base["outside"], f"the unmutated base does not load: {base}"
    tally = campaign.fuzz(target, _budget(target))
    assert tally.iterations >= _budget(target) // 2
    findings = [f for f in campaign.findings.values() if f["target"] == target.name]
    report = "\n".join(f"{f['count']}x {f['signature']}: {f['error'][:200]} {f['outside'][:2]} "
                       f"(reproducer: {f['reproducers'][0]})" for f in findings)
    assert tally.counts["crash"] == 0 and tally.counts["hang"] == 0 and tally.outside == 0, \
        f"{target.name}: {tally.counts}, {tally.outside} outside reads\n{report}"
