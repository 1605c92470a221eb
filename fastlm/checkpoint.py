"""Crash-safe training checkpoints for ``fastlm train``: atomic, verified, resharding, and a stop at the next step
boundary on SIGTERM / SIGINT.

Layout of a training run's folder (``--out``)::

    OUT/step-00000300/      a complete checkpoint: torch.distributed.checkpoint (DCP) files of the model and
        .metadata             optimizer state dicts (one __<rank>_<i>.distcp per writing rank), extra.pt (step, data
        __0_0.distcp          position, every rank's RNG states, the model config, the run's seed and global batch),
        extra.pt              and MANIFEST.json, written last: every file's size and SHA-256
        MANIFEST.json
    OUT/step-00000200/      the previous one, kept until a newer one is complete (``keep`` = 2 in all)
    OUT/.step-00000400.tmp/ a checkpoint being written (never read)

Writing (every rank): DCP writes and fsyncs the state into the hidden temporary folder; rank 0 writes extra.pt,
hashes every file, writes and fsyncs MANIFEST.json, renames the folder to its final name (atomic) and fsyncs
``OUT``; only then are older checkpoints beyond ``keep`` removed. A crash at any point leaves the previous checkpoint
intact, and at worst a ``.tmp`` folder that the next save replaces.

Reading: the newest ``step-*`` folder whose manifest checks (every file present, of its size and hash) is used; one
that does not (truncated, corrupt, without a manifest) is refused with a message on stderr naming the file and
why, and the previous one is tried. The state dicts go through ``torch.distributed.checkpoint.state_dict``
(get_state_dict / set_state_dict), so one checkpoint loads into any layout: a plain module, DDP, FSDP2 or tensor
parallel on any number of ranks (DCP reshards on load: saved by 2 FSDP ranks, resumed by 1, and the reverse). The
folder must be on a file system every rank sees (as DCP requires).
"""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import warnings

import torch
import torch.distributed as dist

FORMAT = 2  # 1: the single-file OUT/checkpoint.pt of earlier fastlm versions (model rows of qkv in (3, nh, hs) order)
MANIFEST = "MANIFEST.json"
EXTRA = "extra.pt"
PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, truncated or corrupt files; no usable checkpoint at all)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save / load that it assumes a single process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def step_dir(out: str, step: int) -> str:
    return os.path.join(out, f"{PREFIX}{step:08d}")


def _gather(obj) -> list:
    """Every rank's ``obj`` (a list of one entry without a process group)."""
    if not dist.is_initialized():
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save(out: str, step: int, model, optimizer, extra: dict, device: torch.device, keep: int = 2) -> str:
    """Write the checkpoint of ``step`` atomically (collective: every rank calls it); returns its folder.

    ``extra``: picklable run metadata (config, seed, ...) saved beside the step and every rank's RNG states."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final, tmp = step_dir(out, step), os.path.join(out, f".{PREFIX}{step:08d}.tmp")
    rank = _rank()
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save that crashed earlier
        os.makedirs(tmp)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    rngs = _gather(rng_state(device))
    if rank == 0:
        meta = {**extra, "format": FORMAT, "step": step, "data_position": step, "rng": rngs}
        with open(os.path.join(tmp, EXTRA), "wb") as f:
            torch.save(meta, f)
            f.flush()
            os.fsync(f.fileno())
        files = {name: {"bytes": os.path.getsize(p), "sha256": _sha256(p)} for name, p in _files(tmp)}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"format": FORMAT, "step": step, "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        if os.path.exists(final):  # a checkpoint of this very step (a resumed run that re-saves it)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_path(out)
        for old in complete_steps(out)[keep:]:  # only now: the new one is complete
            shutil.rmtree(step_dir(out, old), ignore_errors=True)
    _barrier()
    return final


def _files(folder: str) -> list[tuple[str, str]]:
    return sorted(
        (name, os.path.join(folder, name))
        for name in os.listdir(folder)
        if name != MANIFEST and os.path.isfile(os.path.join(folder, name))
    )


def complete_steps(out: str) -> list[int]:
    """The steps of the ``step-*`` folders in ``out``, newest first (complete or not: verify() tells)."""
    if not os.path.isdir(out):
        return []
    steps = [int(n[len(PREFIX) :]) for n in os.listdir(out) if n.startswith(PREFIX) and n[len(PREFIX) :].isdigit()]
    return sorted(steps, reverse=True)


def verify(folder: str) -> None:
    """Raise CheckpointError saying what is wrong unless every file of ``folder``'s manifest is there, of its size
    and SHA-256."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} is incomplete: it has no {MANIFEST} (written last)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {folder} is corrupt: its {MANIFEST} does not parse ({exc})") from None
    for name, want in files.items():
        p = os.path.join(folder, name)
        if not os.path.isfile(p):
            raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is missing")
        size = os.path.getsize(p)
        if size != want["bytes"]:
            raise CheckpointError(
                f"checkpoint {folder} is truncated or corrupt: {name} has {size} bytes, the manifest says "
                f"{want['bytes']}"
            )
        if _sha256(p) != want["sha256"]:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} does not match its SHA-256 in the manifest")


def latest(out: str) -> str | None:
    """The newest checkpoint folder of ``out`` that verifies, None when ``out`` has none at all. Refused ones are
    reported on stderr (rank 0 checks, every rank gets its answer). Raises CheckpointError when there are
    checkpoints but none verifies."""
    answer = [None, []]
    if _rank() == 0:
        errors = []
        for step in complete_steps(out):
            folder = step_dir(out, step)
            try:
                verify(folder)
            except CheckpointError as exc:
                errors.append(str(exc))
                print(f"fastlm: refusing {exc}; trying the previous checkpoint", file=sys.stderr, flush=True)
                continue
            answer = [folder, errors]
            break
        else:
            answer = [None, errors]
    if dist.is_initialized():
        dist.broadcast_object_list(answer, src=0)
    folder, errors = answer
    if folder is None and errors:
        raise CheckpointError(f"no usable checkpoint in {out}: " + "; ".join(errors))
    return folder


def read_extra(folder: str) -> dict:
    return torch.load(os.path.join(folder, EXTRA), map_location="cpu", weights_only=False)


def load(folder: str, model, optimizer=None) -> dict:
    """Load ``folder``'s state into ``model`` (and ``optimizer``), whatever their layout (collective); returns the
    checkpoint's extra metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        state = {"model": get_model_state_dict(model)}
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
        set_model_state_dict(model, state["model"])
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return read_extra(folder)


class StopSignal:
    """SIGTERM / SIGINT noted, not acted on: the training loop asks ``requested()`` at each step boundary, which
    all-reduces the flag (MAX) so that every rank stops after the same step, even when only one got the signal.
    A second signal of the same kind while the first is pending falls back to the previous handler (a second
    Ctrl-C interrupts at once). ``restore()`` puts the previous handlers back."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers (a stop then needs the process killed)
                pass

    def _handle(self, signum, frame):
        if self.received == signum:
            previous = self._previous.get(signum)
            self.restore()
            if callable(previous):
                previous(signum, frame)
            else:
                signal.raise_signal(signum)
            return
        self.received = signum

    def requested(self, device: torch.device) -> bool:
        flag = self.received is not None
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
            dist.all_reduce(t, dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
