"""Sharded, atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a folder `step_00000120/` holding:
- the DCP shards of `{"model": ..., "optim": ...}` (each rank writes its own shards; DCP can
  load them back under a different parallel layout),
- `meta.json`: step, the data sampler position (global, layout-independent) and the world size,
- `rank_<r>.pt`: that rank's scheduler and RNG state (loaded with `weights_only=True`).

Atomicity: everything is written to `step_XXXXXXXX.tmp/` and renamed to its final name by rank 0
only after every rank has finished, so a folder without `.tmp` is complete and a crash mid-save
leaves only a `.tmp` folder, which is ignored and cleaned up. The newest `keep_last` complete
checkpoints are kept; older ones are deleted only after a newer one is complete.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

STEP_RE = re.compile(r"^step_(\d{8})$")


@contextlib.contextmanager
def _one_process_quiet(one_process: bool):
    """DCP warns on every save and load without a process group that it assumes one process,
    even when told so with no_dist=True; a single-process job (convert, export, eval) would
    print it for every checkpoint. Only that warning is hushed, and only then."""
    with warnings.catch_warnings():
        if one_process:
            warnings.filterwarnings("ignore", category=UserWarning,
                                    message=r"torch\.distributed is (disabled, )?unavailable or "
                                            r"uninitialized, assuming the intent is to")
        yield


def save_dcp(state: dict, path) -> None:
    """dcp.save of `state` to the folder `path`, collective when a process group is up."""
    one_process = not dist.is_initialized()
    with _one_process_quiet(one_process):
        dcp.save(state, checkpoint_id=str(path), no_dist=one_process)


def load_dcp(state: dict, path, *, one_process: bool | None = None) -> None:
    """dcp.load into `state` (in place) from the folder `path`, resharding to its layout;
    collective when a process group is up, unless `one_process` (each caller loads alone)."""
    one_process = not dist.is_initialized() if one_process is None else one_process
    with _one_process_quiet(one_process):
        dcp.load(state, checkpoint_id=str(path), no_dist=one_process)


def load_model_dcp(model, path) -> None:
    """Only the model's weights from the DCP folder `path` (a checkpoint holding the optimizer
    too, or a model-only save), in place, resharded to `model`'s layout; collective when a
    process group is up."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    load_dcp(state, path)
    set_model_state_dict(model, state["model"])


def model_differences(missing: list, extra: list, reshaped: list) -> list[str]:
    """The clauses of a "holds a different model" message (a few names of each kind)."""
    def few(names):
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    parts = [f"{len(missing)} of this model's tensors are not in it ({few(missing)})"] if missing else []
    if extra:
        parts.append(f"{len(extra)} of its tensors are not in this model ({few(extra)})")
    if reshaped:
        parts.append("shapes differ for " + few(reshaped))
    return parts


def check_model_matches(path: Path, model_sd: dict) -> None:
    """Raise a ValueError naming the differences when the DCP checkpoint at `path` holds
    another model than `model_sd` (parameter names and global shapes; DTensor shards count by
    their full shape), before DCP fails on the first missing key or, worse, loads a model
    with more layers into the first ones of this one without a word. Collective when a process
    group is up (every rank calls it)."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved = {k[len("model."):]: v for k, v in saved.items() if k.startswith("model.")}
    shape = {k: tuple(v.size) for k, v in saved.items() if hasattr(v, "size")}
    mine = (sorted(model_sd), sorted(set(model_sd) - set(saved)),
            [(k, shape[k], tuple(model_sd[k].shape)) for k in sorted(set(model_sd) & set(shape))
             if shape[k] != tuple(model_sd[k].shape)])
    everyone = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        # a pipeline stage holds some of the layers: the model is the union over the ranks,
        # and every rank reaches the same verdict (none goes on into dcp.load alone)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    names = set().union(*(set(e[0]) for e in everyone))
    missing = sorted(set().union(*(set(e[1]) for e in everyone)))
    reshaped = sorted(set().union(*(set(e[2]) for e in everyone)))
    unexpected = sorted(set(saved) - names)
    if not (missing or unexpected or reshaped):
        return
    parts = model_differences(missing, unexpected,
                              [f"{k} (saved {a}, model {b})" for k, a, b in reshaped])
    hint = ""
    if any(k.endswith("mixer.in_proj.weight") for k in unexpected):
        hint = (" It holds Mamba mixers with a fused in_proj: it was written by a ctxscale "
                "version before in_proj was split into in_proj_x and in_proj_z, and cannot be "
                "resumed by this one.")
    raise ValueError(
        f"checkpoint {path} holds a different model: {'; '.join(parts)}.{hint} Resume with the "
        "model settings it was saved with (config.yaml in its run folder), or start afresh "
        "with checkpoint.resume=none; the checkpoint is left as it is."
    )


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def complete_checkpoints(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and STEP_RE.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = complete_checkpoints(folder)
    return found[-1] if found else None


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, folder: str | Path, *, keep_last: int = 2, async_save: bool = False):
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.async_save = async_save and dist.is_initialized()
        # The background writer runs collectives from its own thread: give it its own gloo
        # group so they never interleave with the training loop's collectives.
        self._async_group = dist.new_group(backend="gloo") if self.async_save else None
        self._pending = None  # (future, tmp, final) of an asynchronous save

    # ------------------------------------------------------------------ save
    def save(self, step: int, model, optimizer, scheduler, data_state: dict, *,
             engine=None) -> Path:
        self.wait()
        final = self.folder / f"step_{step:08d}"
        tmp = self.folder / f"step_{step:08d}.tmp"
        if _rank() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a crashed save
        _barrier()
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"scheduler": scheduler.state_dict(), "rng": _rng_state()},
            tmp / f"rank_{_rank()}.pt",
        )
        if _rank() == 0:
            meta = {"step": step, "data": data_state, "world_size": _world(),
                    "format": "deepspeed" if engine is not None else "dcp"}
            (tmp / "meta.json").write_text(json.dumps(meta))
        if engine is not None:  # DeepSpeed ZeRO: its own partitioned format
            _barrier()
            engine.save_checkpoint(str(tmp))
            self._finalize(tmp, final)
            return final
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp),
                                    process_group=self._async_group)
            self._pending = (future, tmp, final)
        else:
            save_dcp(state, tmp)
            self._finalize(tmp, final)
        return final

    def close(self) -> None:
        """Destroy the background writer's group (a job run again in the same process makes a
        new one), unless a save still writes through it (a run that failed mid-save)."""
        if self._async_group is not None and self._pending is None:
            dist.destroy_process_group(self._async_group)
            self._async_group = None

    def wait(self) -> None:
        """Finish a pending asynchronous save (called before the next save and at exit)."""
        if self._pending is not None:
            future, tmp, final = self._pending
            future.result()
            self._pending = None
            self._finalize(tmp, final)

    def _finalize(self, tmp: Path, final: Path) -> None:
        _barrier()
        if _rank() == 0:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in complete_checkpoints(self.folder)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()

    # ------------------------------------------------------------------ load
    def load(self, path: str | Path, model, optimizer, scheduler, *, engine=None) -> dict:
        """Restore model, optimizer, scheduler and RNG from `path`; returns meta (step, data)."""
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise ValueError(
                f"{path} is not a complete ctxscale checkpoint (no meta.json); pass a "
                f"step_XXXXXXXX folder or set checkpoint.resume=none"
            )
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_file} is corrupt ({e}); delete that checkpoint folder") from e
        fmt = meta.get("format", "dcp")
        if (fmt == "deepspeed") != (engine is not None):
            raise ValueError(
                f"{path} was saved in the {fmt!r} format but this run uses "
                f"{'deepspeed' if engine is not None else 'FSDP/DDP (dcp)'}; resume with the same "
                "parallel.dp_engine family (DCP checkpoints reshard across fsdp/ddp/tp/pp/cp)"
            )
        if engine is not None:
            engine.load_checkpoint(str(path))
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            check_model_matches(path, model_sd)
            state = {"model": model_sd, "optim": optim_sd}
            load_dcp(state, path)
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        rank_file = path / f"rank_{_rank()}.pt"
        same_layout = meta.get("world_size") == _world() and rank_file.is_file()
        extra = torch.load(rank_file if same_layout else path / "rank_0.pt", weights_only=True)
        scheduler.load_state_dict(extra["scheduler"])
        if same_layout:
            _set_rng_state(extra["rng"])
        return meta
