"""Multi-node DDP as torchrun starts it: two "nodes" of one CPU process each, each started by its own
``torchrun`` agent (static rendezvous on 127.0.0.1), the script calling ``model.train(num_nodes=2,
devices=1, strategy="ddp")``. Lightning must find torchrun's environment and start no process itself;
the two processes form one world of 2, train on disjoint shares of every epoch, end with the same
(changed) weights, and rank 0's saved model loads."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

_EPOCHS = 3

_SCRIPT = """
import json, os, sys, warnings
warnings.filterwarnings("ignore")
import lightning.pytorch as pl
import scvi
import torch
from st_predict import NH2ST
from st_predict.data import synthetic_tissue

out, batches, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
scvi.settings.seed = 0
tissue = synthetic_tissue(n_sections=4, n_rows=10, n_cols=10, n_genes=60, seed=0)
train = tissue[tissue.obs["section"] != "S3"].copy()
NH2ST.setup_anndata(train, library_key="section", patch_size=32)
model = NH2ST(train, image_size=32, latent_dim=64, n_heads=4, encoder_weights="random", n_genes=40)


def trunk_sum():
    return float(sum(p.detach().double().sum() for p in model.module.trunk.parameters()))


seen = {"initial_trunk_sum": trunk_sum(), "targets": {}, "steps": {}}


class Probe(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        strategy = trainer.strategy
        seen.update(
            global_rank=trainer.global_rank, node_rank=trainer.node_rank, local_rank=trainer.local_rank,
            world_size=trainer.world_size, num_nodes=trainer.num_nodes, num_devices=trainer.num_devices,
            dist_initialized=torch.distributed.is_initialized(),
            dist_rank=torch.distributed.get_rank() if torch.distributed.is_initialized() else None,
            dist_world_size=torch.distributed.get_world_size() if torch.distributed.is_initialized() else None,
            strategy=type(strategy).__name__,
            cluster_environment=type(strategy.cluster_environment).__name__,
            creates_processes_externally=strategy.cluster_environment.creates_processes_externally,
            launcher=type(strategy.launcher).__name__,
            launcher_children=len(getattr(strategy.launcher, "procs", [])),
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        epoch = str(trainer.current_epoch)
        seen["targets"].setdefault(epoch, []).extend(int(i) for i in batch["index"])
        seen["steps"][epoch] = seen["steps"].get(epoch, 0) + 1


model.train(max_epochs=epochs, batch_size=16, batches=batches, accelerator="cpu", devices=1, num_nodes=2,
            strategy="ddp", progress=False, callbacks=[Probe()])
seen.update(trunk_sum=trunk_sum(), pid=os.getpid(), ppid=os.getppid(), n_train=train.n_obs,
            torchelastic_run_id=os.environ.get("TORCHELASTIC_RUN_ID"), rank_after=model.trainer.global_rank)
# the global rank: LOCAL_RANK is 0 on every node
if model.trainer.global_rank == 0:
    model.save(os.path.join(out, "model"), overwrite=True)
with open(os.path.join(out, f"rank{seen['global_rank']}.json"), "w") as f:
    json.dump(seen, f)
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_two_nodes(tmp_path: Path, batches: str, timeout: float = 300) -> list[dict]:
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    agents, logs = [], []
    for node_rank in (0, 1):
        log = open(tmp_path / f"node{node_rank}.log", "w")
        logs.append(log)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(script), str(tmp_path), batches, str(_EPOCHS)]
        agents.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        # until both exit, one fails (the other would wait for it at the next collective) or time is up
        while time.monotonic() < deadline:
            codes = [a.poll() for a in agents]
            if None not in codes or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.5)
        else:
            codes = None
    finally:
        for a in agents:
            if a.poll() is None:
                a.terminate()  # torchrun ends its workers (each in a session of its own) on SIGTERM
        for a in agents:
            try:
                a.wait(timeout=60)
            except subprocess.TimeoutExpired:
                a.kill()
                a.wait()
        for log in logs:
            log.close()
    tails = "\n".join(f"--- node {r} ---\n" + (tmp_path / f"node{r}.log").read_text()[-3000:] for r in (0, 1))
    assert codes is not None, f"the torchrun agents did not finish within {timeout} s\n{tails}"
    assert codes == [0, 0], f"torchrun agents exited with {codes}\n{tails}"
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    for r in ranks:
        r["agent_pid"] = agents[r["node_rank"]].pid
    return ranks


@pytest.mark.slow
def test_two_nodes_started_by_torchrun_train_as_one_world(tmp_path, batches="section"):
    # section batches only: mixed batches under DDP are trained by test_ddp.py
    from st_predict import NH2ST

    ranks = _torchrun_two_nodes(tmp_path, batches)
    assert [r["global_rank"] for r in ranks] == [0, 1]
    r0, r1 = ranks
    for node, r in enumerate(ranks):
        # one process per node, one world of two processes across the two nodes
        assert (r["node_rank"], r["local_rank"]) == (node, 0)
        assert (r["world_size"], r["num_nodes"], r["num_devices"]) == (2, 2, 1)
        assert r["dist_initialized"] and (r["dist_rank"], r["dist_world_size"]) == (node, 2)
        assert r["rank_after"] == node  # model.trainer.global_rank, which the script saves on
        assert r["strategy"] == "DDPStrategy"
        # Lightning found torchrun's environment and launched nothing: its script launcher started no
        # process, and each training process is the direct child of its own torchrun agent
        assert r["cluster_environment"] == "TorchElasticEnvironment" and r["creates_processes_externally"]
        assert r["launcher"] == "_SubprocessScriptLauncher" and r["launcher_children"] == 0
        assert r["torchelastic_run_id"] is not None
        assert r["ppid"] == r["agent_pid"]
    assert r0["pid"] != r1["pid"]
    # each process trained on its own half of every epoch: disjoint target spots, equal step counts
    assert sorted(r0["steps"]) == sorted(r1["steps"]) == [str(e) for e in range(_EPOCHS)]
    for epoch in r0["steps"]:
        t0, t1 = set(r0["targets"][epoch]), set(r1["targets"][epoch])
        assert not t0 & t1, epoch
        assert r0["steps"][epoch] == r1["steps"][epoch] > 0
        # together about one pass over the training spots (incomplete batches are dropped)
        assert r0["n_train"] - 2 * 16 * 2 <= len(t0 | t1) <= r0["n_train"], (epoch, len(t0 | t1))
    # the same starting weights, training changed them, and both processes end with the same ones
    assert r0["initial_trunk_sum"] == r1["initial_trunk_sum"]
    assert r0["trunk_sum"] != r0["initial_trunk_sum"]
    assert r0["trunk_sum"] == r1["trunk_sum"]
    # rank 0 saved the model; it loads with the trained weights
    saved = NH2ST.load(tmp_path / "model")
    assert float(sum(p.detach().double().sum() for p in saved.module.trunk.parameters())) == r0["trunk_sum"]
