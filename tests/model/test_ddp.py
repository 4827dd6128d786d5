"""Training on 2 CPU processes with Lightning's DDP (gloo): the documented call works, no trainable
parameter goes unused, per-section validation, the neighbour cache and saving behave, and the model is
as good as single-process training."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# each run in its own process: Lightning's "ddp" strategy relaunches the script once per device
_SCRIPT = """
import json, os, sys, warnings
warnings.filterwarnings("ignore")
import scvi
import torch
from st_predict import NH2ST
from st_predict.data import synthetic_tissue
from st_predict.metrics import evaluate
from st_predict.pp import normalize_expression

mode, out = sys.argv[1], sys.argv[2]
scvi.settings.seed = 0
tissue = synthetic_tissue(n_sections=4, n_rows=10, n_cols=10, n_genes=60, seed=0)
train = tissue[tissue.obs["section"] != "S3"].copy()
test = tissue[tissue.obs["section"] == "S3"].copy()
NH2ST.setup_anndata(train, library_key="section", patch_size=32)
model = NH2ST(train, image_size=32, latent_dim=64, n_heads=4, encoder_weights="random", n_genes=40,
              gather_negatives=mode == "ddp_gather")
seen = {}


class Probe(__import__("lightning.pytorch", fromlist=["Callback"]).Callback):
    def on_after_backward(self, trainer, pl_module):  # every trainable parameter got a gradient
        seen["unused"] = sorted(n for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is None)
        seen["world"] = trainer.world_size

    def on_train_epoch_end(self, trainer, pl_module):
        cache = pl_module.neighbor_cache
        seen["cache_sum"] = float(cache.double().sum()) if cache is not None else None
        # the logged validation PCC against the PCC of every process's validation predictions, gathered
        import torch.distributed as dist
        from st_predict.train import mean_gene_pcc
        mine = (torch.cat(self.pred), torch.cat(self.truth)) if self.pred else None
        every = [None] * trainer.world_size
        if trainer.world_size > 1:
            dist.all_gather_object(every, mine)
        else:
            every = [mine]
        pred = torch.cat([e[0] for e in every if e is not None])
        truth = torch.cat([e[1] for e in every if e is not None])
        seen.setdefault("val_pcc_pairs", []).append(
            (float(trainer.callback_metrics["validation_pcc"]), float(mean_gene_pcc(pred, truth)), len(pred)))

    def on_validation_epoch_start(self, trainer, pl_module):
        self.pred, self.truth = [], []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.pred.append(outputs["prediction"].float().cpu())
            self.truth.append(outputs["truth"].float().cpu())


kw = dict(max_epochs=6, progress=False, accelerator="cpu", validation="section", best_epoch=True, batch_size=16,
          callbacks=[Probe()])
if mode.startswith("ddp"):
    model.train(devices=2, strategy="ddp", **kw)
else:
    model.train(**kw)
rank = int(os.environ.get("LOCAL_RANK", 0))
truth = normalize_expression(test.X, test.var_names.get_indexer(model.genes_))
res = {"rank": rank, "pcc": float(evaluate(model.get_predicted_expression(test).to_numpy(), truth)["pcc"]),
       "best_epoch": model.best_epoch_,
       # Lightning's loggers write on rank 0 only: the history is rank 0's
       "val_pcc": [float(v) for v in model.history["validation_pcc"].iloc[:, 0]] if rank == 0 else None,
       "trunk_sum": float(sum(p.double().sum() for p in model.module.trunk.parameters())), **seen}
if rank == 0:
    model.save(os.path.join(out, mode), overwrite=True)
with open(os.path.join(out, f"{mode}_rank{rank}.json"), "w") as f:
    json.dump(res, f)
"""


def _run(tmp_path: Path, mode: str) -> list[dict]:
    script = tmp_path / "train_ddp.py"
    script.write_text(_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), mode, str(tmp_path)], capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(p.read_text()) for p in sorted(tmp_path.glob(f"{mode}_rank*.json"))]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_trains_as_well_as_one(tmp_path):
    from st_predict import NH2ST

    single = _run(tmp_path, "single")[0]
    assert single["unused"] == []
    for mode in ("ddp", "ddp_gather"):
        ranks = _run(tmp_path, mode)
        assert [r["rank"] for r in ranks] == [0, 1]
        r0, r1 = ranks
        assert r0["world"] == 2 and r0["unused"] == [] and r1["unused"] == []
        # both processes end with the same weights (of the same best epoch) and the same neighbour cache;
        # the validation PCC, logged every epoch, is the PCC of both processes' validation spots together (not
        # the mean of each process's PCC), and both processes log the same value
        assert r0["trunk_sum"] == r1["trunk_sum"] and r0["best_epoch"] == r1["best_epoch"]
        assert len(r0["val_pcc"]) == 6 and r1["val_pcc"] is None
        for (logged, gathered, n), (logged1, _, n1) in zip(r0["val_pcc_pairs"], r1["val_pcc_pairs"], strict=True):
            assert n == n1 and n >= 100  # every spot of the validation section (100), from both processes
            assert abs(logged - gathered) < 1e-4 and abs(logged1 - logged) < 1e-6, (logged, gathered)
        assert r0["cache_sum"] == r1["cache_sum"]
        # as good as single-process training on the held-out section, within noise
        assert r0["pcc"] > 0.5 * single["pcc"] and abs(r0["pcc"] - single["pcc"]) < 0.1, (mode, r0, single)
        saved = NH2ST.load(tmp_path / mode)
        assert saved.best_epoch_ == r0["best_epoch"]
