"""The PolicyDriver: the only code that calls a policy's hooks, with one admission loop for every engine."""

import ast
from pathlib import Path

import pytest

import fairness
from fairness import PolicyDriver, Request, simulate
from fairness.core.driver import OracleUnavailableError
from fairness.core.request import RequestInfo

HOOKS = {"configure", "add_request", "next_request", "on_admit", "on_preempt", "batch_limits", "on_step", "on_finish",
         "preemption_victim", "on_cancel", "set_oracle"}  # fmt: skip
REPO = Path(__file__).resolve().parent.parent


def _is_policy(node: ast.expr) -> bool:
    """`policy`, `self.policy`, `x._policy`: how engines and tools name the policy they hold."""
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name.lstrip("_").endswith("policy")


def test_only_the_driver_calls_policy_hooks():
    """A hook called on a policy object (or looked up by name with getattr) anywhere but in the driver would be a
    second way of driving policies, with its own order and timing."""
    offenders = []
    for path in sorted([*(REPO / "fairness").rglob("*.py"), *(REPO / "lab").rglob("*.py")]):
        if path.name == "driver.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            hook_call = isinstance(f, ast.Attribute) and f.attr in HOOKS and _is_policy(f.value)
            lookup = (isinstance(f, ast.Name) and f.id == "getattr" and _is_policy(node.args[0])
                      and (not isinstance(node.args[1], ast.Constant) or node.args[1].value in HOOKS))  # fmt: skip
            if hook_call or lookup:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders
    assert _is_policy(ast.parse("self.policy").body[0].value)  # the rule sees the engines' spelling


class _Recorder(fairness.SchedulingPolicy):
    """FCFS that logs every hook the driver calls."""

    name = "recorder"

    def __init__(self):
        self.queue, self.log = [], []

    def add_request(self, req, now):
        self.log.append(("add", req.id))
        self.queue.append(req)

    def next_request(self, now):
        self.log.append(("next",))
        return self.queue[0] if self.queue else None

    def on_admit(self, req, now):
        self.log.append(("admit", req.id))
        self.queue.remove(req)

    def on_preempt(self, req, now):
        self.queue.insert(0, req)

    def batch_limits(self, now):
        return (10_000, 1)  # one running request at a time, whatever the engine allows


def test_candidates_stop_at_the_first_request_the_engine_does_not_take():
    policy = _Recorder()
    driver = PolicyDriver(policy)
    for i in range(3):
        driver.arrive(RequestInfo(i, "a", 0.0, 10, 10, 1.0), 0.0)
    taken = []
    for info in driver.candidates(0.0, lambda: True):
        if info.id == 1:
            break  # does not fit: it stays queued at the policy
        driver.admit(info, 0.0)
        taken.append(info.id)
    assert taken == [0] and [r.id for r in policy.queue] == [1, 2]
    seen = list(driver.candidates(0.0, lambda: True))  # a candidate not admitted ends the loop too
    assert [r.id for r in seen] == [1] and [r.id for r in policy.queue] == [1, 2]
    assert driver.limits(0.0, 512, 64) == (512, 1)  # the engine's maxima lowered by the policy's
    assert driver.calls["next_request"] == 3 and driver.overhead_us()["decision_us"] >= 0


def test_the_simulator_runs_through_the_driver():
    policy = _Recorder()
    reqs = [Request("a", 0.0, 10, 5), Request("b", 0.0, 10, 5)]
    res = simulate(reqs, policy)
    admits = [e[1] for e in policy.log if e[0] == "admit"]
    assert admits == [0, 1] and res.metrics["finished"] == 2
    assert res.records[1].first_token_s > res.records[0].finish_s - 1e-9  # batch_limits held one running at a time


def test_an_oracle_needs_true_lengths():
    oracle = fairness.make_policy("vtc-oracle")
    with pytest.raises(OracleUnavailableError, match="only a simulation knows"):
        PolicyDriver(oracle).start(fairness.EngineModel(), fairness.Telemetry(nvml=False), oracle=None)
    res = simulate([Request("a", 0.0, 10, 5)], "vtc-oracle")  # the simulator hands them over
    assert res.metrics["finished"] == 1
