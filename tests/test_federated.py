"""Fusion as a Flower strategy: K digits parties fused each round on Flower's simulation engine and on a real
deployment on loopback; a hostile or broken client is left out of its round and the round goes on."""

from __future__ import annotations

import csv
import io
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="the flower extra (pip install -e '.[flower]')")

from flwr.app import Array, ArrayRecord, Error, MetricRecord, RecordDict  # noqa: E402

from otfuse.data import load_dataset  # noqa: E402
from otfuse.errors import OtfuseError  # noqa: E402
from otfuse.federated import (  # noqa: E402
    FederationError,
    OTFusion,
    Settings,
    local_update,
    packed,
    reference_model,
    settings_of,
    unpacked,
)
from otfuse.fusion import FuseConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Reply:
    """What the strategy reads of a Flower reply: its content or error, and the node it came from."""

    content: RecordDict | None
    node: int
    error: Error | None = None
    metadata: SimpleNamespace = field(init=False)

    def __post_init__(self):
        self.metadata = SimpleNamespace(src_node_id=self.node)

    def has_error(self) -> bool:
        return self.error is not None


def _reply(state: dict, metrics: dict, node: int) -> Reply:
    return Reply(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)}), node)


@pytest.fixture(scope="module")
def parties(tmp_path_factory):
    """Two digits parties of a Dirichlet split, one local epoch each from the shared start, and the strategy."""
    settings = Settings(width=4, local_epochs=1, device="cpu", data_dir=str(tmp_path_factory.mktemp("data")))
    data = load_dataset("digits", settings.data_dir)
    reference = reference_model(settings, data)
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    trained = [local_update(settings, party, 2, 1, start) for party in (1, 2)]
    return settings, data, reference, trained


def _strategy(parties, minimum: int = 2) -> OTFusion:
    settings, data, reference, _ = parties
    cfg = FuseConfig(head="counts")
    return OTFusion(reference, data.val_x, data.norm, cfg, min_train_nodes=minimum, most=len(data.train_y))


def _fused(strategy: OTFusion, replies: list[Reply]) -> dict:
    arrays, metrics = strategy.aggregate_train(1, replies)
    return arrays.to_torch_state_dict(), metrics


def _good(parties) -> list[Reply]:
    return [_reply(state, metrics, node) for node, (state, metrics) in zip((11, 12), parties[3])]


def _same_fusion_without(parties, hostile: Reply, reason: str) -> None:
    """Fusing the good clients with `hostile` gives the fusion of the good ones alone, and one line names its node."""
    alone, _ = _fused(_strategy(parties), _good(parties))
    strategy = _strategy(parties)
    mixed, metrics = _fused(strategy, [*_good(parties), hostile])
    assert all(torch.equal(alone[k], mixed[k]) for k in alone)
    assert metrics["left-out"] == 1 and metrics["clients"] == 2
    (line,) = strategy.left_out[1]
    assert line.startswith(f"round 1: node {hostile.node} left out: ") and reason in line and "\n" not in line, line


def test_a_model_of_another_architecture_is_left_out(parties):
    settings, data, _, trained = parties
    other = reference_model(Settings(width=8), data).state_dict()
    _same_fusion_without(parties, _reply(other, trained[0][1], 13), "shape")


def test_a_model_of_another_class_count_is_left_out(parties):
    state = {k: v[:5] if k.startswith("fc.") else v for k, v in parties[3][0][0].items()}
    _same_fusion_without(parties, _reply(state, parties[3][0][1], 13), "fc.weight has shape (5, ")


def test_non_finite_weights_are_left_out(parties):
    state = {k: v.clone() for k, v in parties[3][0][0].items()}
    next(v for v in state.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    _same_fusion_without(parties, _reply(state, parties[3][0][1], 13), "NaN or infinite")


def test_out_of_range_weights_and_variances_are_left_out(parties):
    huge = {k: v * 1e9 if v.is_floating_point() else v for k, v in parties[3][0][0].items()}
    _same_fusion_without(parties, _reply(huge, parties[3][0][1], 13), "beyond")
    negative = {k: -v if k.endswith("running_var") else v for k, v in parties[3][0][0].items()}
    _same_fusion_without(parties, _reply(negative, parties[3][0][1], 14), "negative variances")


def test_wrong_shapes_and_missing_tensors_are_left_out(parties):
    state = dict(parties[3][0][0])
    name = next(k for k, v in state.items() if v.ndim == 4)
    state[name] = state[name].reshape(state[name].shape[0], -1)
    _same_fusion_without(parties, _reply(state, parties[3][0][1], 13), "shape")
    fewer = dict(list(parties[3][0][0].items())[1:])
    _same_fusion_without(parties, _reply(fewer, parties[3][0][1], 14), "tensors missing")


def test_counts_that_lie_are_left_out(parties):
    state, metrics = parties[3][0]
    _same_fusion_without(parties, _reply(state, {**metrics, "num-examples": metrics["num-examples"] + 1}, 13), "class-counts sum")
    _same_fusion_without(parties, _reply(state, {**metrics, "num-examples": 10**9}, 14), "not a count")
    _same_fusion_without(parties, _reply(state, {"test-acc": 99.0}, 15), "lack num-examples")


def test_a_crashed_client_is_left_out(parties):
    _same_fusion_without(parties, Reply(None, 13, Error(code=1, reason="Traceback ... RuntimeError: out of memory")), "failed")


def test_a_pickled_array_is_refused_unread(parties, tmp_path):
    """numpy's allow_pickle=False: a client's bytes that would run code when unpickled are never unpickled."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    buffer = io.BytesIO()
    np.save(buffer, np.array([Payload()], dtype=object), allow_pickle=True)
    assert pickle.loads(pickle.dumps(Payload())) is None and marker.exists()  # the payload works when unpickled
    marker.unlink()
    state, metrics = parties[3][0]
    arrays = ArrayRecord(state)
    name = next(iter(state))
    arrays[name] = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())
    hostile = Reply(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), 13)
    _same_fusion_without(parties, hostile, "cannot be decoded")
    assert not marker.exists()


def test_weights_travel_packed_one_array_per_dtype_and_unpack_exactly(parties):
    """Flower sends each array of a record as an object of its own: a state goes as one flat array per dtype and
    comes back bit for bit; FedAvg's key-wise average of packed records is its average of the plain ones."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    (a, metrics), (b, _) = parties[3]
    record = packed(a)
    assert sorted(record) == ["packed-float32", "packed-int64"] and len(ArrayRecord(a)) > 100
    back = unpacked(record, a)
    assert list(back) == list(a) and all(torch.equal(back[k], a[k]) and back[k].dtype == a[k].dtype for k in a)
    assert unpacked(ArrayRecord(a), a).keys() == a.keys()  # a plain record, as any Flower client sends, as it is
    weighed = [RecordDict({"arrays": ArrayRecord(s), "metrics": MetricRecord({"num-examples": n})}) for s, n in ((a, 3), (b, 1))]
    plain = aggregate_arrayrecords(weighed, "num-examples").to_torch_state_dict()
    weighed = [RecordDict({"arrays": packed(s), "metrics": MetricRecord({"num-examples": n})}) for s, n in ((a, 3), (b, 1))]
    averaged = unpacked(aggregate_arrayrecords(weighed, "num-examples"), a)
    assert all(torch.equal(averaged[k], plain[k].to(a[k].dtype)) for k in a)


def test_packed_replies_fuse_as_plain_ones_and_a_packed_reply_that_does_not_fit_is_left_out(parties):
    plain, _ = _fused(_strategy(parties), _good(parties))
    strategy = _strategy(parties)
    strategy.packs = True  # as configure_train sets it for a round started packed
    replies = [Reply(RecordDict({"arrays": packed(s), "metrics": MetricRecord(m)}), n) for n, (s, m) in zip((11, 12), parties[3])]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert sorted(arrays) == ["packed-float32", "packed-int64"]
    fused = unpacked(arrays, plain)
    assert all(torch.equal(fused[k], plain[k]) for k in plain)
    state, metrics = parties[3][0]
    wider = packed(reference_model(Settings(width=8), parties[1]).state_dict())
    _same_fusion_without(parties, Reply(RecordDict({"arrays": wider, "metrics": MetricRecord(metrics)}), 13), "another architecture")
    floats_only = packed({k: v for k, v in state.items() if v.is_floating_point()})
    _same_fusion_without(parties, Reply(RecordDict({"arrays": floats_only, "metrics": MetricRecord(metrics)}), 14), "packed arrays are")


def test_a_silent_client_is_left_out_and_fewer_than_the_minimum_end_the_run_in_one_line(parties):
    """Node 13 was asked and never replied: one line names it; the round goes on with the two others, as without it."""
    alone, _ = _fused(_strategy(parties), _good(parties))
    strategy = _strategy(parties)
    strategy.sampled[1] = [11, 12, 13]  # as configure_train records the nodes it asks
    fused, _ = _fused(strategy, _good(parties))
    assert all(torch.equal(alone[k], fused[k]) for k in alone)
    assert strategy.left_out[1] == ["round 1: node 13 left out: no reply within the round's timeout"]
    strategy = _strategy(parties, minimum=3)
    with pytest.raises(FederationError) as e:
        strategy.aggregate_train(4, _good(parties))
    assert str(e.value) == "round 4: 2 valid client model(s) of the 3 required (2 replied); the run ends"


def test_the_run_config_is_checked_in_one_line():
    assert settings_of({"rounds": 3, "alpha": 1}).alpha == 1.0  # Flower's integers are floats where a float is meant
    for bad, words in (
        ({"rounds": 0}, "rounds 0 must be at least 1"),
        ({"strategy": "fedsgd"}, "strategy 'fedsgd'"),
        ({"fusion-data": "test"}, "fusion-data 'test'"),
        ({"alpha": "x"}, "alpha = 'x': give a float"),
        ({"epochs": 3}, "unknown key(s) epochs"),
    ):
        with pytest.raises(OtfuseError, match=None) as e:
            settings_of(bad)
        assert words in str(e.value) and "\n" not in str(e.value), (bad, str(e.value))


@pytest.mark.slow
def test_three_digits_parties_for_two_rounds_on_flowers_simulation(tmp_path):
    """`otfuse federate` (Flower's simulation engine): the server's test accuracy after each round, in the log and
    the CSV, the fused model above the worst client's own, the clients' ensemble above it too."""
    out = tmp_path / "rounds.csv"
    cmd = [sys.executable, "-m", "otfuse", "federate", "--clients", "3", "--rounds", "2", "--local-epochs", "2", "--device", "cpu"]
    run = subprocess.run([*cmd, "--data-dir", str(tmp_path / "data"), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    for r in (1, 2):
        assert f"otfuse: round {r}, otfusion: test accuracy" in run.stderr + run.stdout
    rows = list(csv.DictReader(open(out)))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    last = rows[-1]
    assert float(last["test_acc"]) > float(last["worst_client_acc"]), rows
    assert float(last["worst_client_acc"]) < float(last["ensemble_acc"]) <= 100, rows
    assert rows[0]["ensemble_acc"] == ""  # round 0 is the start: no clients yet
    assert int(last["bytes"]) > 0 and float(last["seconds"]) > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (Flower starts its apps in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_superlink_and_two_supernodes_on_loopback_run_one_round_and_stop(tmp_path):
    """A real deployment: a SuperLink and two SuperNodes as processes on 127.0.0.1, `flwr run` of the App in
    flower/ for one round, then everything stopped: no process left."""
    port = _free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    bin_dir = Path(sys.executable).parent
    # the SuperLink starts flower-superexec from PATH: the venv's, whether or not the venv is activated
    env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    link = ["flower-superlink", "--insecure", "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port)]
    link += ["--database", str(tmp_path / "state.db")]
    procs = [subprocess.Popen([bin_dir / link[0], *link[1:]], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    seen: set[int] = set()
    try:
        for i in range(2):
            node = ["--insecure", "--superlink", f"127.0.0.1:{port}", "--host", "127.0.0.1", "--port", str(_free_port())]
            node += ["--node-config", f"partition-id={i} num-partitions=2"]
            procs.append(
                subprocess.Popen([bin_dir / "flower-supernode", *node], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                assert time.time() < deadline, "the SuperLink did not start in 60 s"
                time.sleep(0.2)
        out = tmp_path / "rounds.csv"
        config = f"rounds=1 local-epochs=1 width=4 out='{out}' data-dir='{tmp_path / 'data'}'"
        run = subprocess.run(
            [bin_dir / "flwr", "run", str(ROOT / "flower"), "loopback", "--stream", "--run-config", config],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        for p in procs:
            seen |= _descendants(p.pid)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
        rows = list(csv.DictReader(open(out)))
        assert [r["round"] for r in rows] == ["0", "1"] and rows[1]["strategy"] == "otfusion", rows
    finally:
        for p in procs:
            seen |= _descendants(p.pid)
        everything = seen | {p.pid for p in procs}
        for pid in everything:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 20
        while any(_alive(pid) for pid in everything) and time.time() < deadline:
            time.sleep(0.2)
        for pid in everything:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        for p in procs:
            p.wait(10)
    assert not [pid for pid in everything if _alive(pid)]


def test_without_flower_the_command_says_how_to_install_it(tmp_path):
    """The extra missing (flwr hidden from the import system): one line naming the install command, exit 2."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "flwr.py").write_text("raise ImportError('No module named flwr')\n")
    env = {**os.environ, "PYTHONPATH": f"{hide}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run([sys.executable, "-m", "otfuse", "federate", "--rounds", "2"], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "pip install -e '.[flower]'" in run.stderr, run.stderr


def test_clients_are_weighted_by_their_image_counts_as_fedavg_weighs_them(parties):
    """The strategy's fusion is `fuse()` of the replies, the largest client first, weighted by image counts, the
    classifier refit by class counts."""
    from otfuse.fusion import fuse

    settings, data, reference, trained = parties
    (s1, m1), (s2, m2) = trained
    fused, _ = _fused(_strategy(parties), _good(parties))
    order = [(s1, m1), (s2, m2)] if m1["num-examples"] >= m2["num-examples"] else [(s2, m2), (s1, m1)]
    models = []
    for state, _ in order:
        m = reference_model(settings, data)
        m.load_state_dict(state)
        models.append(m)
    cfg = FuseConfig(head="counts", weights=",".join(str(m["num-examples"]) for _, m in order))
    cfg.distill.epochs = 0.0  # the strategy's default: no distillation in a round (fuse()'s own is one pass for parties)
    counts = torch.tensor([m["class-counts"] for _, m in order])
    direct = fuse(models, data.val_x, data.norm, cfg, class_counts=counts).fused.state_dict()
    assert all(torch.equal(direct[k], fused[k]) for k in direct)


def test_a_shared_start_is_one_model_and_own_starts_differ():
    """`init = shared`: every client's round-1 start is the server's model; `own`: each its own seed's."""
    from otfuse.federated import party_config

    shared = [party_config(Settings(init="shared"), p, 3, 1, Path("x.pt")).init_seed for p in (1, 2, 3)]
    own = [party_config(Settings(init="own"), p, 3, 1, Path("x.pt")).init_seed for p in (1, 2, 3)]
    assert len(set(shared)) == 1 and shared[0] == Settings().seed and len(set(own)) == 3
    assert len({party_config(Settings(), p, 3, r, Path("x.pt")).seed for p in (1, 2) for r in (1, 2)}) == 4  # fresh batches each round


def test_anchor_global_aligns_every_client_onto_the_rounds_start(parties):
    """A client sending the round's start with its channels permuted, and one sending the start as it is: aligned onto
    the start (`anchor = global`, weight 0) both are the start, so the fusion is the start; aligned onto the largest
    client (the permuted one), the fusion is the permuted start: the same function, channels in the client's order."""
    from otfuse import channel_groups, permute, random_maps
    from otfuse.options import build

    settings, data, reference, trained = parties
    start = reference_model(settings, data)
    start.load_state_dict(trained[0][0])
    x = torch.zeros(1, *data.train_x.shape[1:])
    permuted = permute(start, (groups := channel_groups(start, x)), random_maps(groups, seed=5)).state_dict()
    metrics = trained[0][1]
    more = [c + (i == 0) for i, c in enumerate(metrics["class-counts"])]
    bigger = {**metrics, "num-examples": metrics["num-examples"] + 1, "class-counts": more}
    cfg = build(FuseConfig, {"refit": False, "bn_batches": 0})
    results = {}
    for anchor in ("global", "largest"):
        strategy = OTFusion(reference, data.val_x, data.norm, cfg, min_train_nodes=2, most=len(data.train_y), anchor=anchor)
        strategy.round_start = {k: v.clone() for k, v in start.state_dict().items()}  # as configure_train records it
        results[anchor], _ = _fused(strategy, [_reply(permuted, bigger, 11), _reply(start.state_dict(), metrics, 12)])
    own = start.state_dict()
    floats = [k for k, v in own.items() if v.is_floating_point()]
    assert all(torch.allclose(results["global"][k], own[k], atol=1e-6) for k in floats)
    assert all(torch.allclose(results["largest"][k], permuted[k], atol=1e-6) for k in floats)
    assert not all(torch.allclose(permuted[k], own[k]) for k in floats)


def test_after_its_fusion_rounds_the_server_averages_the_clients_as_fedavg(parties):
    """`fusion_rounds = 1`: round 1 is the fusion; from round 2, when every client trained from one fused model, the
    global model is FedAvg's average of the same replies (Flower's own, weighted by image counts)."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    settings, data, reference, trained = parties
    once = OTFusion(reference, data.val_x, data.norm, FuseConfig(head="counts"), min_train_nodes=2, most=len(data.train_y), fusion_rounds=1)
    once.round = 1  # as configure_train sets it
    fused, _ = _fused(once, _good(parties))
    always, _ = _fused(_strategy(parties), _good(parties))
    assert all(torch.equal(fused[k], always[k]) for k in always)
    once.round = 2
    averaged, metrics = _fused(once, _good(parties))
    flowers = aggregate_arrayrecords([r.content for r in _good(parties)], "num-examples").to_torch_state_dict()
    floats = [k for k, v in averaged.items() if v.is_floating_point()]
    assert all(torch.allclose(averaged[k], flowers[k], atol=1e-6) for k in floats) and metrics["clients"] == 2
    assert not all(torch.allclose(averaged[k], fused[k], atol=1e-3) for k in floats)
    with pytest.raises(OtfuseError, match="fusion-rounds -1 must be at least 0"):
        Settings(fusion_rounds=-1).check()


def test_after_fusion_fedprox_asks_the_averaged_rounds_clients_for_its_proximal_term(parties, monkeypatch):
    """`after-fusion = fedprox`: round 1's clients (fused after) train plain; from round 2 (averaged) each is asked
    for FedProx's proximal term, as Flower's FedProx asks; a resumed run counts its rounds from the first."""
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_task_id", "_run_id", "_node_id"):  # a ServerApp's, as Flower sets them before its main
        monkeypatch.setattr(TaskIdentity, key, 1)
    settings, data, reference, _ = parties
    grid = SimpleNamespace(get_node_ids=lambda: [11, 12])
    strategy = OTFusion(reference, data.val_x, data.norm, FuseConfig(), min_train_nodes=2, fusion_rounds=1, proximal_mu=0.5)
    start = ArrayRecord(reference.state_dict())

    def asked(server_round: int, offset: int = 0) -> list:
        messages = strategy.configure_train(server_round, start, ConfigRecord({"round-offset": offset}), grid)
        return [m.content["config"].get("proximal-mu") for m in messages]

    assert asked(1) == [None, None] and asked(2) == [0.5, 0.5] and asked(1, offset=1) == [0.5, 0.5]
    plain = OTFusion(reference, data.val_x, data.norm, FuseConfig(), min_train_nodes=2, fusion_rounds=1)
    assert [m.content["config"].get("proximal-mu") for m in plain.configure_train(2, start, ConfigRecord(), grid)] == [None, None]
    with pytest.raises(OtfuseError, match="after-fusion 'fedsgd': use fedavg or fedprox"):
        Settings(after_fusion="fedsgd").check()


def test_the_bench_collects_each_runs_rounds_from_its_state_and_draws_them(tmp_path):
    """`bench_federated.py --collect`: the rounds each run's state file holds (here the CIFAR-10 rows measured, split
    back into states) go to the CSV, and one figure of accuracy against rounds is drawn from it."""
    from otfuse.plots import is_own_figure
    from otfuse.storage import save_torch

    from support import bench_module

    measured = list(csv.DictReader(open(ROOT / "bench" / "federated-cifar10-jpeg-w16.csv")))
    runs = ["dir0.5-otfusion", "dir0.5-fedavg"]
    for run in runs:
        keep = ("strategy", "round", "test_acc", "worst_client_acc", "best_client_acc")
        rows = [{k: r[k] for k in keep} for r in measured if r["run"] == run]
        save_torch(tmp_path / f"{run}.pt", {"round": int(rows[-1]["round"]), "weights": {}, "rows": rows})
    out = tmp_path / "federated.csv"
    argv = ["--collect", "--runs", ",".join(runs), "--state-dir", str(tmp_path), "--out", str(out), "--results-dir", str(tmp_path)]
    assert bench_module("bench_federated").main(argv) == 0
    got = list(csv.DictReader(open(out)))
    key = lambda r: (r["run"], r["round"], r["test_acc"])
    assert sorted(map(key, got)) == sorted(key(r) for r in measured if r["run"] in runs)
    assert is_own_figure(tmp_path / "federated.png")
