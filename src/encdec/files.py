"""Reading safetensors checkpoints and writing output directories atomically."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from encdec.errors import EncdecError, ReadFailed, first_line

log = logging.getLogger("encdec")
# errors of writing that the user can act on (space, permissions, names), reported in one line
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.EBUSY,
                errno.EISDIR, errno.ENOTDIR}
SHARD_BYTES = 4 * 1024**3
# what atomic_dir leaves behind when its process is killed: .NAME.tmp-HOST-PID-XXXXXXXX or
# .NAME.old-HOST-PID-XXXXXXXX (the 8 characters tempfile.mkdtemp adds); nothing looser, since whatever matches is
# deleted (a user's ".x.old-2024" is not)
RUN_LOCK = ".encdec.lock"  # held by a training run while it writes its directory (training/rundir.py)
RUN_FILES = (RUN_LOCK, "checkpoints", "metrics.jsonl")  # what marks a training run's directory
OutputKind = tuple[str, Callable[[Path], bool]]  # what a command's output directory is: said, and tested
# atomic_dir's temporaries, and single files' (temporary_beside): .NAME.tmp-HOST-PID-xxxxxxxx, HOST: the machine
# whose process PID writes it, so that a write on another machine or container sharing the directory is never taken
# for dead. An older form without HOST is no longer taken for one: a user's ".vim.old-2024-original" matched it, and
# was deleted by the next write beside it
_TEMPORARY = re.compile(r"\.(.+)\.(tmp|old)-([A-Za-z0-9-]+)-(\d+)-[a-z0-9_]{8}")
MACHINE = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _machine_id() -> str:
    """A digest of /etc/machine-id, where the machine has one: a machine's own PID namespace has the same id on every
    Linux, so two machines of one name (clones, a shared "localhost") writing into one network folder had one HOST,
    and each took the other's live writes for dead ones of its own, and deleted them."""
    try:
        text = Path("/etc/machine-id").read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return ""
    return f"-m{hashlib.sha256(text.encode()).hexdigest()[:8]}" if text else ""


def _pid_namespace() -> str:
    """The PID namespace's id, where /proc tells it: containers that share the machine's name (host networking)
    number their processes apart, and another's live writer had looked dead from here."""
    try:
        return f"-ns{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


HOST = MACHINE + _machine_id() + _pid_namespace()
EARLIER_HOST = MACHINE + _pid_namespace()  # this machine's mark before the machine-id was part of it (or another's)


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON value")


def parse_json(raw: bytes | str, *, strict: bool = False) -> Any:
    """json.loads, every way a text fails to be JSON raised as a ValueError saying why: bad UTF-8 or syntax, nesting
    too deep to read (a RecursionError otherwise), an integer of over 4300 digits, and with `strict` the NaN and
    Infinity that Python reads but JSON does not have."""
    try:
        return json.loads(raw, parse_constant=_not_json) if strict else json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None


# a JSON file this project reads (configurations, metadata, a run's state: KB to a few MB; tokenizer.json is read
# by the tokenizers library): parsed, a file takes about 22 times its size (a handed 1 GB encdec.json, 25 GB)
MAX_SMALL_BYTES = 64 << 20


def file_start(path: Path, size: int) -> bytes:
    """The first `size` bytes of the regular file `path` (a format's magic number); one line where it cannot be read
    (another user's file, umask 077: a PermissionError traceback)."""
    try:
        with open_regular(path) as f:
            return f.read(size)
    except OSError as e:
        raise ReadFailed(f"cannot read {path}: {e.strerror or e}") from None


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading, if it is a regular file (OSError otherwise): a link to /dev/zero read until memory
    ran out; a pipe, forever (its open alone waits for a writer without O_NONBLOCK, which a regular file ignores)."""
    f = os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise OSError(errno.EINVAL, "not a regular file (a device, a pipe, a directory?)")
    return f


def read_small(path: Path) -> bytes:
    """The bytes of a configuration or state file a user may have been handed: a regular file (`open_regular`), and
    not past MAX_SMALL_BYTES (OSError otherwise)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_SMALL_BYTES:
            raise OSError(errno.EFBIG, f"{size:,} bytes, more than a configuration file holds")
        return f.read()


def open_named(path: Path) -> BinaryIO:
    """`path` opened for reading, if it is a regular file or a pipe (`<(jq -c ... data.json)`, /dev/stdin: a file
    the user names on the command line); a device (a link to /dev/zero, read until memory ran out) is refused
    (OSError) unread."""
    f = open(path, "rb")  # noqa: SIM115 - handed to the caller
    if not (stat.S_ISREG(mode := os.fstat(f.fileno()).st_mode) or stat.S_ISFIFO(mode)):
        f.close()
        raise OSError(errno.EINVAL, "not a file or a pipe (a device?)")
    return f


def read_named(path: Path) -> bytes:
    """The bytes of a file the user names on the command line (--config, --grid): a regular file, or a pipe
    (`--config <(envsubst < run.yaml)`, /dev/stdin), up to MAX_SMALL_BYTES (OSError past it); a device (a link to
    /dev/zero, read until memory ran out) is refused unread."""
    with open_named(path) as f:
        data = f.read(MAX_SMALL_BYTES + 1)
    if len(data) > MAX_SMALL_BYTES:
        raise OSError(errno.EFBIG, f"more than {MAX_SMALL_BYTES:,} bytes, more than a configuration file holds")
    return data


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object (every JSON file the project reads is one)."""
    try:
        data = parse_json(read_small(path))
    except FileNotFoundError:
        raise EncdecError(f"{path} is missing") from None
    except OSError as e:  # a directory in its place, or a file its owner alone may read (umask 077)
        raise EncdecError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise EncdecError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise EncdecError(f"{path} holds a JSON {type(data).__name__}; expected a JSON object ({{...}})")
    return data


@contextlib.contextmanager
def reading_config(path: Path) -> Iterator[None]:
    """Turn what a damaged or hand-edited configuration file makes its reader raise (a missing field, a wrong
    type or value, an EncdecError that does not name the file) into one line naming `path`."""
    try:
        yield
    except KeyError as e:
        raise EncdecError(f"{path} lacks the field {e}; is it a complete configuration?") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as e:  # (10**400 as a float)
        raise EncdecError(f"{path} is not a usable configuration ({type(e).__name__}: {e})") from None
    except EncdecError as e:
        raise EncdecError(f"{path}: {e}" if str(path.parent) not in str(e) else str(e)) from None
    except RuntimeError as e:  # sizes no tensor can hold, even on the meta device (a vocab_size of 2**62)
        if "overflow" not in str(e).lower():
            raise
        raise EncdecError(f"{path} declares sizes no tensor can hold ({first_line(e)})") from None


def inside(directory: Path, name: object, listed_in: Path) -> Path:
    """A file a checkpoint's own metadata names: a plain file name in the checkpoint directory, nothing else."""
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise EncdecError(f"{listed_in} names {name!r}; only file names inside {directory} are accepted")
    return directory / name


def refuse_transformers_weights(config: dict, path: Path) -> None:
    """A config.json's `transformers_weights` makes transformers load the file it names (a pickle, a shard index
    leading anywhere) instead of the weights encdec checks and reads: refused wherever transformers loads."""
    if config.get("transformers_weights") is not None:
        named = str(config["transformers_weights"])[:80]
        raise EncdecError(f"{path} names transformers_weights {named!r}, which encdec does not read; accepted: "
                          "weights in model.safetensors or the shards its index lists (remove the key, naming the "
                          "file so)")


def refuse_quantized(data: dict, directory: Path) -> None:
    """Refuse the config.json `data` of a quantized checkpoint (GPTQ, AWQ, bitsandbytes...), decoder-only or
    encoder-decoder, before a weight is read: its tensors are not the weights encdec reads (read, they were named
    as a truncated or foreign checkpoint's)."""
    quantized = next((section["quantization_config"] for section in (data, data.get("text_config"))
                      if isinstance(section, dict) and section.get("quantization_config") is not None), None)
    if quantized is not None:
        method = quantized.get("quant_method") if isinstance(quantized, dict) else None
        shown = method if isinstance(method, str) else repr(quantized)
        raise EncdecError(f"{directory} is a quantized model (quantization_config: {shown}); encdec "
                          "reads models in floating-point weights: give the unquantized model")


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: model.safetensors, or the shards its index lists (each
    a file of the directory itself, never a path that leads out of it)."""
    index = directory / "model.safetensors.index.json"
    if index.exists() and (directory / "model.safetensors").exists():  # transformers reads the one, encdec the other
        raise EncdecError(f"{directory} holds both model.safetensors and model.safetensors.index.json (one left by an "
                          "earlier save, sharded or not): remove the stale one, so that every reader loads the same "
                          "weights")
    if index.exists():
        weight_map = read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict):
            raise EncdecError(f"{index}: weight_map is not a JSON object")
        files = sorted({inside(directory, f, index) for f in weight_map.values()})
        if not files:
            raise EncdecError(f"{index} lists no weight files")
        return files
    if (directory / "model.safetensors").exists():
        return [directory / "model.safetensors"]
    found = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pth")]
    extra = f" (found {', '.join(found)}: only safetensors weights are read)" if found else ""
    raise EncdecError(f"{directory} has no model.safetensors or model.safetensors.index.json{extra}")


def read_weights(directory: Path, dtype: torch.dtype | None = None, *, mapped: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: model.safetensors, or the shards its index lists.

    Each tensor is read into memory of its own, unless `mapped`: then the tensors point into a memory map of
    the file (pages read on demand and reclaimable by the kernel, but all of the file's pages that were read
    stay resident while any of its tensors lives), which suits weights that are copied elsewhere at once
    (resuming training) and not weights that are kept (`_read_safetensors` says why)."""
    weights: dict[str, torch.Tensor] = {}
    check_utf8(directory)  # safetensors' refusal of such a name read as a corrupt file
    for file in weight_files(directory):
        if not file.exists():
            raise EncdecError(f"weight shard {file} is missing")
        try:
            for name, t in _mapped_safetensors(file) if mapped else _read_safetensors(file):
                weights[name] = t if dtype is None or not t.is_floating_point() else t.to(dtype)
        except OSError as e:
            raise ReadFailed(f"cannot read {file}: {e.strerror or e}") from None
        except (ValueError, RuntimeError, SafetensorError) as e:
            raise EncdecError(f"{file} is not a readable safetensors file, truncated or corrupt? ({e})") from None
    return weights


def _mapped_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    open_regular(file).close()  # (safetensors' own open of a pipe waits for a writer)
    with safe_open(str(file), framework="pt") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on a file's JSON header
# the element types of the safetensors format that torch holds
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _read_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of a safetensors file, read into memory of its own (ValueError if the file is malformed).

    Not memory-mapped: a mapped file's pages stay resident while any tensor of it lives, so a model that
    packs, quantizes or casts its weights as it loads would keep the whole file resident beside its own
    copies (+1.4 GB for the adapted 270M served on CPU). Read this way, each weight that is replaced is freed."""
    with open_regular(file) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8 or (length := int.from_bytes(head, "little")) > size - 8:
            raise ValueError("the header is cut off")
        if length > MAX_HEADER_BYTES:  # parsed, a header of 19 MB (300k empty tensors) held 300 MB
            raise ValueError(f"its header claims {length:,} bytes, more than the format's limit of "
                             f"{MAX_HEADER_BYTES:,}")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"its header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        header.pop("__metadata__", None)
        start, expected = 8 + length, 0
        for name, entry in sorted(header.items(), key=_offsets):  # (start, end): an empty tensor before its neighbour
            begin, end = _offsets((name, entry))
            if begin != expected:  # as the format requires (and safetensors checks): no tensor shares or skips bytes
                raise ValueError(f"tensor {name}: its bytes start at {begin}, where the tensors before it end at "
                                 f"{expected} (overlapping or gapped data_offsets)")
            expected = end
            kind, shape = entry.get("dtype"), entry.get("shape")
            dtype = SAFETENSORS_DTYPES.get(kind) if isinstance(kind, str) else None
            if dtype is None or not isinstance(shape, list) or not all(
                    isinstance(n, int) and 0 <= n < 2**63 for n in shape):  # [0, 2**70] is 0 bytes torch cannot shape
                raise ValueError(f"tensor {name}: unsupported dtype {kind!r} or bad shape {shape!r}")
            # checked before anything is allocated: the shape's bytes are those the file gives the tensor
            if end - begin != math.prod(shape) * dtype.itemsize or start + end > size:
                raise ValueError(f"tensor {name}: its bytes {begin}-{end} do not match its shape or lie past the end")
            tensor = torch.empty(shape, dtype=dtype)
            f.seek(start + begin)
            if tensor.numel() and f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != end - begin:
                raise ValueError(f"tensor {name} is cut off")
            yield name, tensor
        if start + expected != size:
            raise ValueError(f"its tensors end at byte {start + expected} of {size}: bytes no tensor names")


def _offsets(item: tuple[str, Any]) -> tuple[int, int]:
    name, entry = item
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {name}: bad data_offsets")
    return offsets[0], offsets[1]


def write_native(directory: Path, meta: dict, weights: dict[str, torch.Tensor]) -> None:
    """The project's own formats: `meta` (format name, version, configuration) as config.json, then the weights."""
    (directory / "config.json").write_text(json.dumps(meta, indent=2))
    write_weights(directory, weights)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, the file getting the mode a plain open() gives it: safetensors creates 0600 files, so
    another account (a server's, a shared cache's next user) could not read a model this one wrote."""
    save_file(tensors, str(path), metadata=metadata)
    plain_mode(path)


def write_weights(directory: Path, weights: dict[str, torch.Tensor]) -> None:
    """Write model.safetensors, or shards of at most SHARD_BYTES with the standard index."""
    weights = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in weights.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_tensors(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_tensors(shard, directory / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def check_writable_place(out: Path) -> None:
    """Fail before any work when `out` cannot become a directory: it, or a folder above it, is a file, or a link
    that leads nowhere (a mount that is not there: its mkdir's FileExistsError came after the work)."""
    out = Path(out)
    with written(out):  # a name too long to look up
        refuse_dangling(out, EncdecError)
        if out.exists() and not out.is_dir():
            raise EncdecError(f"output path {out} exists and is not a directory")
        blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise EncdecError(f"cannot write {out}: {blocking} is a file, not a directory")


def refuse_dangling(out: Path, error: type[EncdecError] = EncdecError) -> None:
    """Raise `error` when `out` or a folder above it is a link that leads nowhere (a mount that is not there):
    mkdir's FileExistsError there is no write error `written` knows, a traceback after the work."""
    dangling = next((p for p in (out, *out.parents) if p.is_symlink() and not p.exists()), None)
    if dangling is not None:
        raise error(f"cannot write {out}: {dangling} is a link to {os.readlink(dangling)}, which does not exist")


def expand_user(text: str) -> str:
    """`text` with a leading ~ or ~user expanded, as a shell would; EncdecError where no home directory is found
    for it (pathlib's RuntimeError otherwise, a traceback)."""
    expanded = os.path.expanduser(text)
    if expanded.startswith("~"):
        raise EncdecError(f"{text}: no home directory is known for {expanded.split(os.sep)[0]} on this machine; give "
                          "the path without it")
    return expanded


def check_utf8(text: str | Path) -> None:
    """EncdecError where a path (a model's, an output's) is not UTF-8: a name of other bytes reaches Python with
    stand-ins that the safetensors and tokenizers libraries refuse, so such a run failed after its work (a trained
    run's checkpoints then read as "corrupt")."""
    try:
        os.fspath(text).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(text).decode("utf-8", "backslashreplace")
        raise EncdecError(f"{shown}: the path is not UTF-8 text, and the libraries that write and read models "
                          "(safetensors, tokenizers) take UTF-8 names only; rename it") from None


def check_name_room(out: Path, name: str) -> None:
    """Fail before any work when the longest name written beside `out` on the way to `name` (a temporary's, or a
    directory's moved-aside old copy: .NAME.tmp-HOST-PID-XXXXXXXX) is longer than its folder's filesystem allows:
    `out` itself fitted, and hours of work ended at ENAMETOOLONG, nothing written."""
    out = Path(out).absolute()
    longest = len(os.fsencode(f".{name}.tmp-{HOST}-{os.getpid()}-XXXXXXXX"))
    existing = next((p for p in out.parents if p.is_dir()), None)
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX") if existing is not None else 255
    except (OSError, ValueError):  # no such setting here
        limit = 255
    if longest > limit:
        spare = limit - (longest - len(os.fsencode(out.name)))
        raise EncdecError(f"output {out.name[:40]}...: its name is too long for the temporary written beside it "
                          f"({longest} bytes, where this filesystem allows {limit}); give a name of at most "
                          f"{max(spare, 1)} bytes")


class WriteFailed(EncdecError):
    """A write failed for a reason the user can act on (`written`)."""


@contextlib.contextmanager
def written(out: Path) -> Iterator[None]:
    """Report a failed write of `out` that the user can act on (a full disk, a read-only or forbidden place, a
    name too long) as one line instead of a traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        failed = Path(os.fsdecode(e.filename)) if isinstance(e.filename, (str, bytes, os.PathLike)) else None
        if failed is not None and not _part_of(failed, Path(out)):  # an input read on the way, or another place
            raise WriteFailed(f"{failed}: {e.strerror} (while writing {out})") from None
        where = f" ({failed})" if failed is not None and failed != Path(out) else ""  # the file it failed on
        raise WriteFailed(f"cannot write {out}: {e.strerror}{where}") from None
    except SafetensorError as e:  # the writer's own error for a failed write
        if "I/O error" not in str(e):
            raise
        raise WriteFailed(f"cannot write {out}: {str(e).split('I/O error: ', 1)[-1]}") from None


def _part_of(path: Path, out: Path) -> bool:
    """Whether `path` is `out`, lies in it, or in one of its temporaries (atomic_dir's .OUT.tmp-..., .OUT.old-...),
    or is a directory above it that writing it makes."""
    path, out = Path(os.path.abspath(path)), Path(os.path.abspath(out))
    if path == out or out in path.parents or path in out.parents:
        return True
    inside = path.relative_to(out.parent).parts if out.parent in path.parents else ()
    return bool(inside) and inside[0].startswith(f".{out.name}.")


def check_apart(out: Path, inputs: tuple[str | Path | None, ...], *, inside: bool = False) -> None:
    """Fail before any work when writing `out` would replace what the command reads: `out` is one of the
    `inputs` (paths; names that are not paths are skipped) or holds one, or with `inside`, lies inside one (a
    file written into a model's directory)."""
    target = Path(os.path.expanduser(out)).resolve()
    for spec in inputs:  # (os.path's expansion leaves a ~user it cannot expand as it is: pathlib's raised)
        path = None if spec is None or str(spec) == "" else Path(os.path.expanduser(spec))
        if path is None or not path.exists():
            continue
        path = path.resolve()
        if path == target or target in path.parents:
            raise EncdecError(f"--out {out} {'is' if path == target else 'holds'} the input {spec}: writing it would "
                              "replace the input; choose another --out")
        if inside and path.is_dir() and path in target.parents:
            raise EncdecError(f"--out {out} is inside the input {spec}: writing it would change the input; choose "
                              "another --out")


def check_output_file(out: Path, inputs: tuple[str | Path | None, ...], overwrite: bool) -> Path:
    """The path to write the file `out` at (through a symbolic link: the file it names, the link kept); fail
    before any work when it cannot be written, or would replace an input or a file inside one (a model's
    config.json): it is a directory or another thing than a file (a device, a pipe: the rename would put a file in
    its place), a folder above it is a file, or the nearest existing folder above it is not writable; or it exists
    and not `overwrite` (an earlier run's completions were replaced unasked)."""
    out = Path(out).expanduser()
    refuse_planted_link(out)
    refuse_dangling(out.parent)
    if out.is_symlink() and out.exists() and not out.is_file() and not out.is_dir():  # /dev/stdout into a pipe: the
        # link names /proc/PID/fd/pipe:[N], which no path reaches (a FileNotFoundError once all was generated)
        raise EncdecError(f"--out {out} leads to a device, a pipe or a socket, not a file; - writes to standard output")
    out = out.resolve() if out.is_symlink() else out  # the checks below are of the file the link names
    check_apart(out, inputs, inside=True)
    with written(out):
        if out.is_dir():
            raise EncdecError(f"--out {out} is a directory; give a file name such as completions.jsonl")
        if out.exists() and not out.is_file():
            raise EncdecError(f"--out {out} is not a regular file (a device, a pipe or a socket), which writing would "
                              "replace with one; give a file name (- writes to standard output)")
        if out.is_file() and not overwrite:
            raise EncdecError(f"--out {out} already exists; pass --overwrite to replace it, or give another file")
    check_file_place(out, f"{out.name}.partial")  # the longest name: what a stopped run writes (.OUT.partial.tmp-...)
    return out


def check_file_place(out: Path, name: str) -> None:
    """Fail before any work when the file `out` cannot be written where it is: a folder above it is a file, the
    nearest existing one is not writable, or the temporary of `name` written beside it has no room for its name
    (`check_name_room`)."""
    with written(out):
        check_writable_place(out.parent)
        check_name_room(out, name)
    check_folder_writable(out)


def check_folder_writable(out: Path, *, into: bool = False) -> None:
    """Fail when the folder that `out` is written into (the one it sits in; `into`: `out` itself), or the nearest
    one that exists, does not let this user write there: found by the write at the end, after the work."""
    with written(out):
        target = Path(out).resolve()
        folder = target if into else target.parent
        existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EncdecError(f"cannot write {out}: {existing} is not writable")


def check_not_above(out: Path) -> None:
    """Fail when `out`, which a command fills with outputs of fixed names (model/, checkpoints/...) or replaces
    whole, is the working directory or one above it (where it has been deleted, none is: a run launched from a
    scratch folder cleaned up meanwhile stopped at its next checkpoint)."""
    try:
        here = Path.cwd().resolve()
    except FileNotFoundError:
        return
    if Path(out).expanduser().resolve() in (here, *here.parents):
        raise EncdecError(f"--out {out} is the current directory or one above it; name a directory of its own")


def check_output_dir(out: Path, overwrite: bool, inputs: tuple[str | Path | None, ...] = (),
                     replaces: tuple[str, ...] = (), kind: OutputKind | None = None, into: bool = False,
                     inside: bool = False) -> None:
    """Fail before any work when the output directory, which is replaced whole, would clobber something: an
    existing `out` without `overwrite`, a training run's directory even with it (its checkpoints, a live run's
    lock), any of the `inputs` (check_apart), the working directory or one above; and, for a command's --out, a
    directory with files but none of the names its earlier output holds (`replaces`): `--out ~/models
    --overwrite`, meant as "into", replaced the whole folder; or one that holds them but is not what the command
    writes (`kind`: its description, and the test of a directory): any folder with a config.json (a decoder-only
    source, a project) was replaced by `adapt --overwrite`. `into`: the command writes inside `out` (the
    quickstart), which must then be writable, rather than replacing it beside itself. `inside`: nor inside one of
    the `inputs` (an export kept in the model's folder, which the model's next --overwrite would delete)."""
    if Path(out).is_symlink():  # replaced by the output, the link went and what it named stayed as it was; the
        # command line writes through a link (`through_link`), a run directory's planted one must not be followed
        raise EncdecError(f"output directory {out} is a symbolic link; give the directory it names "
                          f"({os.path.realpath(out)}) to write there")
    check_writable_place(out)
    check_name_room(out, Path(out).name)
    check_folder_writable(out, into=into)  # (an adapt of a 9B source found it after loading and adapting it)
    if Path(out).parent.is_dir():  # a version a killed write moved aside goes back first: found only as this
        with contextlib.suppress(OSError):  # output was renamed into place, it failed the command after its work
            remove_abandoned_temporaries(Path(out).parent)
    check_not_above(out)
    check_apart(out, inputs, inside=inside)
    if out.exists() and not overwrite:
        raise EncdecError(f"output directory {out} already exists; pass --overwrite (overwrite=True in Python) to "
                          "replace it")
    if not into and out.is_dir() and os.path.ismount(out):  # a container's volume: its rename was refused after all
        # the work (one written into, the quickstart's, is written as any folder is)
        raise EncdecError(f"output directory {out} is a mount point, which the output cannot replace (it is "
                          "written whole beside it, then renamed into place): give a folder inside it, such as "
                          f"{out / 'model'}")
    run = [name for name in RUN_FILES if (out / name).exists()]
    if out.is_dir() and run:
        raise EncdecError(f"output directory {out} holds a training run ({', '.join(run)}), which --overwrite does "
                          "not replace; choose another --out")
    try:
        kept = replaces and out.is_dir() and not out.is_symlink()
        held = sorted(entry.name for entry in out.iterdir()) if kept else []
    except OSError as e:
        raise EncdecError(f"cannot read output directory {out}: {e.strerror or e}") from None
    if held and not set(held) & set(replaces):
        raise EncdecError(f"output directory {out} holds {', '.join(held[:3])}{', ...' if len(held) > 3 else ''} but "
                          f"none of what this command writes there ({', '.join(replaces)}): --overwrite replaces an "
                          "earlier output, not another folder; choose another --out, or remove it yourself")
    folders = [name for name in held if name not in replaces and (out / name).is_dir() and not (out / name).is_symlink()
               and (name == ".git" or not name.startswith("."))] if not into else []  # (not a tool's .cache)
    if folders:  # replaced whole, the output would take them with it (a run or an export kept inside a model)
        raise EncdecError(f"output directory {out} holds the folder {folders[0]}, which is no part of what this "
                          "command writes: --overwrite would delete it with the rest; move it out first, or choose "
                          "another --out")
    if held and kind is not None and not kind[1](out):
        raise EncdecError(f"output directory {out} is not {kind[0]}, what this command writes there: --overwrite "
                          "replaces an earlier output, not another model or folder; choose another --out, or remove "
                          "it yourself")


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False, replaces: tuple[str, ...] = (),
               kind: OutputKind | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `out` only once everything was written (`replaces`: the
    names one of which an existing `out` must hold to be replaced, `kind` what it must be: check_output_dir).

    On any error the temporary directory is removed and an existing `out` is left untouched.
    """
    out = Path(out).expanduser()  # encdec.save(model, "~/m") from Python, as the CLI's paths are read
    check_output_dir(out, overwrite, replaces=replaces, kind=kind)
    with written(out):
        out.parent.mkdir(parents=True, exist_ok=True)  # (what killed writes left there: cleaned by check_output_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{HOST}-{os.getpid()}-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would keep the output from everyone else
    try:
        with written(out):
            yield tmp
            _sync_tree(tmp)  # on disk before it takes the old one's place (a crash must not leave a hollow output)
            if out.exists() and not overwrite:
                raise EncdecError(f"{out} was written by another process while this one wrote it; it is kept, and "
                                  "this output is not written (pass --overwrite to replace it)")
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{HOST}-{os.getpid()}-", dir=out.parent))
                try:
                    os.replace(out, old / out.name)
                    os.replace(tmp, out)
                except BaseException:  # a failure, or a Ctrl-C (raised right after the call it came in): decided
                    # from what is there, as the interruption may fall between the renames or after the second
                    if not out.exists() and (old / out.name).exists():  # the previous output goes back
                        os.replace(old / out.name, out)
                    elif (old / out.name).exists():  # the new one is in place (interrupted after the second)
                        _keep_modes(old / out.name, out)
                    shutil.rmtree(old, ignore_errors=True)
                    raise
                _keep_modes(old / out.name, out)  # once in place (a temporary of 0555 could not be moved or removed)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
            _sync(out.parent)  # the rename itself, before anything older is removed (old checkpoints, after a save)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _keep_modes(replaced: Path, out: Path) -> None:
    """The permissions of the directory `out` replaced, and of its files of the same names, on `out`'s: a private
    checkpoint (0700, its files 0600) came back readable by everyone after an --overwrite."""
    with contextlib.suppress(OSError):  # (a mode that cannot be set: the umask's stays)
        for new, old in ((out, replaced), *((entry, replaced / entry.name) for entry in out.iterdir())):
            if not new.is_symlink() and old.exists() and not old.is_symlink():
                os.chmod(new, stat.S_IMODE(old.stat().st_mode))


# what fsync says where a system cannot sync a path (a directory, some file systems): passed over
_CANNOT_SYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EROFS})


def _sync(path: Path) -> None:
    """fsync a file or a directory (a directory's entries: renames, new files), where the system allows it. A
    failed write-back (a full disk, a quota, an I/O error: on network file systems often said only here) is
    raised: what was written is not whole, and must not take an older output's place."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not readable as such here (a directory on some systems): nothing to sync through
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _CANNOT_SYNC:
            raise
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    for directory, _, names in os.walk(root):
        for name in names:
            _sync(Path(directory) / name)
        _sync(Path(directory))


def _umask_at_import() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK_AT_IMPORT = _umask_at_import()  # set and restored while importing, before this module starts threads


def plain_mode(path: str | Path) -> None:
    """Give the file at `path` the mode a plain open() would have: readable by whom the umask allows."""
    os.chmod(path, 0o666 & ~umask())


def umask() -> int:
    """This process's file mode creation mask: read from /proc (not changed: changing it would race other
    threads); where there is no /proc (macOS, BSD), the mask the process had when encdec was imported."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return UMASK_AT_IMPORT


def process_alive(pid: int) -> bool:
    """Whether a process of this machine has this id (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


MAX_PID = 2**31 - 1  # a pid_t's largest: a larger number is no process id (os.kill raised OverflowError)


def _left_by_us(entry: Path, match: re.Match, kind: Callable[[int], bool] = stat.S_ISDIR, anyone: bool = False) -> bool:
    """Whether `entry` may be a temporary of this machine's writes: a folder (or, by `kind`, a file) itself, not a
    link (whose target would be moved out or deleted: a link named like one, put in a shared output folder or cache
    or a run directory handed over, made the next write move what it leads to), of this user, and of a process id
    this machine could have."""
    try:
        info = entry.lstat()
    except OSError:
        return False
    mine = not hasattr(os, "getuid") or info.st_uid == os.getuid()
    pid = match[4]
    return (kind(info.st_mode) and mine and (anyone or match[3] == HOST) and len(pid) <= 10
            and 0 < int(pid) <= MAX_PID)


def remove_abandoned_temporaries(parent: Path, anyone: bool = False) -> None:
    """Delete the temporary directories that killed writes (atomic_dir) left in `parent`: they can hold
    gigabytes. A directory whose writing process still runs is left alone; a previous version that a
    write killed between its two renames had moved aside is put back first, never deleted. `anyone`: those of
    any machine or container too, for a directory only the caller writes (a run's checkpoints, under its lock: a
    job restarted on another node left its predecessor's for good)."""
    abandoned = []
    for entry in parent.iterdir():
        match = _TEMPORARY.fullmatch(entry.name)
        # marked as this machine's were before the machine-id was part of the mark (`EARLIER_HOST`): a previous
        # version moved aside is put back, nothing deleted (it may be a live write of another machine of this name)
        earlier = bool(match) and not anyone and match[3] == EARLIER_HOST != HOST
        if (match and _left_by_us(entry, match, anyone=anyone or earlier)
                and (anyone or not process_alive(int(match[4])))):
            abandoned.append((match[2] == "tmp", entry, match[1], earlier))
    for unfinished, entry, name, earlier in sorted(abandoned):  # the .old- ones first
        moved_aside = entry / name  # in a .tmp- one, a child of the same name is part of the unfinished output
        if not unfinished and moved_aside.exists() and not (parent / name).exists():
            log.warning("restoring %s, moved aside by an interrupted write", parent / name)
            os.replace(moved_aside, parent / name)
        if earlier:
            log.warning("%s is an interrupted write's, marked as an earlier encdec marked it (or another machine named "
                        "%s): kept; remove it if no other machine of that name writes here", entry, MACHINE)
        else:
            log.info("removing %s, left by an interrupted write", entry)
            shutil.rmtree(entry, ignore_errors=True)


def refuse_planted_link(out: Path) -> None:
    """Refuse an --out that is another user's link to nothing (planted in a shared /tmp): writing through it would
    make its target wherever it points, past the kernel's protection of such links (encdec follows it itself)."""
    if out.is_symlink() and not out.exists() and out.lstat().st_uid != os.getuid():
        raise EncdecError(f"--out {out} is another user's link to {os.readlink(out)}, which does not exist: writing "
                          "would make it; remove the link, or give another --out")


def through_link(out: Path) -> Path:
    """A command's --out that is a symbolic link names the place the output goes: its target (the link stays), where
    the checks of an output apply and which the output replaces, as `generate --out` writes through a link (the
    link itself was replaced by a directory, whatever its target held); not another user's link to nothing."""
    refuse_planted_link(out)
    return Path(os.path.realpath(out)) if out.is_symlink() else out


def temporary_beside(path: Path) -> tuple[int, str]:
    """mkstemp's (descriptor, name) of a new file beside `path` to write it through: named after this machine and
    process (the random tail keeps it unforeseeable, so that a shared cache's other user cannot plant a link there),
    so that the next write of `path` removes what a killed one left (a cache file's temporary can be a gigabyte)."""
    for entry in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        match = _TEMPORARY.fullmatch(entry.name)
        if (match and match[1] == path.name and match[2] == "tmp" and _left_by_us(entry, match, stat.S_ISREG)
                and not process_alive(int(match[4]))):
            log.info("removing %s, left by an interrupted write", entry)
            entry.unlink(missing_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.tmp-{HOST}-{os.getpid()}-", dir=path.parent)


def file_identity(path: Path, *, change_time: bool = True) -> str:
    """What tells a file's contents apart without reading them, for cache keys: its real path, size, modification
    and change times and inode (a copy that keeps size and mtime, cp -p or rsync -a, cannot keep the other two).
    Without `change_time`, a file whose permissions, owner or hard links changed (chmod -R, cp -al) keeps its
    identity, and one written in its place (same inode, or a new one) still does not."""
    stat = path.stat()
    identity = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"
    return f"{identity}:{stat.st_ctime_ns}" if change_time else identity


def refuse_link(path: Path, linked: bool | None = None) -> None:
    """A file or folder a run keeps in its directory (its lock, metrics, checkpoints) is its own: a run directory
    someone handed over must not make encdec read, write or delete wherever its links point (`linked`: whether it
    is a link, as another process found it)."""
    if path.is_symlink() if linked is None else linked:
        raise EncdecError(f"{path} is a symbolic link; encdec writes it itself and does not follow links there: "
                          "delete the link (a run on another disk: give that place as --out)")


def open_own(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open of such a file (`refuse_link`), the link refused by the open itself (O_NOFOLLOW: no race)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        refuse_link(path)
        raise


def atomic_write(path: Path, text: str, *, exclusive: bool = False) -> None:
    """Write a text file through a temporary sibling and a rename: readers (and a crash) never see half a file.
    `exclusive`: FileExistsError, and nothing written, when `path` exists by the time the file is whole."""
    atomic_write_files({Path(path): text}, exclusive=exclusive)


def write_cache(path: Path, write: Callable[[Path], None], what: str, otherwise: str) -> bool:
    """Write the cache file `path` through a temporary beside it (`write(temporary)`), renamed once whole; whether
    it was written. A cache that cannot be written (a read-only or full disk) is a warning naming `what` it would
    hold and what happens `otherwise`, since its contents are at hand, and leaves no partial file."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = temporary_beside(path)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        plain_mode(tmp)  # whatever mode the writer made (safetensors, mkstemp: 0600)
        _sync(tmp)  # whole on disk before its name says so: a crash must not leave a cache of the right name and zeros
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        failed_write = isinstance(e, SafetensorError) and "I/O error" in str(e)  # safetensors' own (a full disk)
        if not isinstance(e, OSError) and not failed_write:
            raise
        log.warning("could not cache %s in %s (%s); %s", what, path, e, otherwise)
        return False
    return True


def atomic_write_files(texts: dict[Path, str], *, exclusive: bool = False) -> None:
    """Write text files that belong together (a table and its data): every one to a temporary sibling first, then
    all renamed, so that a failed write (a full disk) replaces none of them. `exclusive`: a file that exists by
    then is not replaced (FileExistsError), named by a hard link, which fails where a name exists, in one step."""
    temporaries: list[tuple[str, Path]] = []
    try:
        for path, text in texts.items():
            with written(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, name = temporary_beside(path)
                temporaries.append((name, path))
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                try:  # the mode of the file it replaces (a private one, 0600, stays private), else a plain open's
                    os.chmod(name, stat.S_IMODE(path.stat().st_mode))
                except FileNotFoundError:
                    plain_mode(name)  # not mkstemp's 0600
        for name, path in temporaries:
            with written(path):
                if exclusive:
                    _name_once(name, path)
                else:
                    os.replace(name, path)
                _sync(path.parent)
    except BaseException:
        for name, _ in temporaries:
            with contextlib.suppress(OSError):
                os.unlink(name)
        raise


def _name_once(temporary: str, path: Path) -> None:
    """Give the whole file `temporary` the name `path` unless that exists (FileExistsError): checked and named in
    one step by a hard link; where the filesystem has none, checked just before the rename."""
    try:
        os.link(temporary, path, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(temporary, path)
        return
    os.unlink(temporary)


def portable_path(spec: str) -> str:
    """A model or data specification as it can be found again later: local paths made absolute, names kept."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec
