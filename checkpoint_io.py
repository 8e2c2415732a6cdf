"""Careful checkpoint I/O for the converter, with no knowledge of any model format.

- Reading untrusted folders: configs as JSON only, weights with torch.load(weights_only=True, mmap=True)
  or safetensors; nothing is imported or executed. A `Checkpoint` knows every tensor's shape and dtype up
  front and then streams the tensors file by file.
- Key tables: `key_table` turns rows of "SOURCE TARGET [PART]" into a mapping, and a `Mapper` streams
  tensors through it, assembling a target once all its parts have arrived.
- The dry run: `plan` converts shapes only, on the meta device, so unknown, missing or misshapen tensors
  are all reported before anything is written.
- Writing: `ShardWriter` writes shards as tensors arrive, `output_folder` stages them beside DST and moves
  the folder into place only when complete, and `progress_bar` shows how far a long write has come.
"""

import contextlib
import dataclasses
import errno
import fnmatch
import json
import math
import os
import re
import sys
import zipfile
from collections import Counter, defaultdict

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from model_folder import staged_folder


class ConversionError(ValueError):
    """A checkpoint that cannot be converted as is; `names` lists the offending tensors, files or fields."""

    def __init__(self, message: str, names=()):
        super().__init__(message)
        self.names = list(names)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DEFAULT_SHARD_SIZE = "5GB"
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
# Errors of a write that the user can act on (a full disk, a quota, a read-only file system).
_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def listing(names, limit=40) -> str:
    names = list(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# --------------------------------------------------------------------------- reading


def read_json(path: str) -> dict:
    """A JSON object from a regular file (a FIFO or a device would block or never end)."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path} is missing or not a regular file", [path])
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as err:  # ValueError: bad JSON or bad UTF-8
        raise ConversionError(f"cannot read {path}: {err}", [path]) from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} is not a JSON object", [path])
    return data


def _load_bin(path: str) -> dict:
    """torch.load restricted to tensors (weights_only), memory-mapped when the file format allows it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure to read untrusted input is a conversion error
        if zipfile.is_zipfile(path):
            raise ConversionError(f"cannot read {path}: {err}", [path]) from None
        try:  # the legacy (pre-zip) torch.save format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err2:  # noqa: BLE001
            raise ConversionError(f"cannot read {path} (truncated or not a PyTorch checkpoint): {err2}",
                                  [path]) from None
    if isinstance(state, dict) and not any(torch.is_tensor(v) for v in state.values()):
        for key in ("model", "state_dict", "module"):  # training checkpoints wrap the state dict
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ConversionError(f"{path} does not hold a state dict of tensors", [path])
    return state


def _file_specs(path: str) -> dict:
    """name -> (shape, dtype) of the tensors in one file."""
    if not path.endswith(".safetensors"):
        return {name: (tuple(t.shape), t.dtype) for name, t in _load_bin(path).items()}
    try:
        with safe_open(path, "pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            return {name: (tuple(s.get_shape()), _SAFETENSORS_DTYPES[s.get_dtype()]) for name, s in slices.items()}
    except Exception as err:  # noqa: BLE001
        raise ConversionError(f"cannot read {path} (truncated or not safetensors): {err}", [path]) from None


def _file_tensors(path: str):
    if not path.endswith(".safetensors"):
        yield from _load_bin(path).items()
        return
    with safe_open(path, "pt") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def _weight_files(path: str):
    """The weight files of a folder (through its index when there is one), or a single file.
    Returns (files, index weight map or None)."""
    if os.path.isfile(path):
        return [path], None
    if not os.path.isdir(path):
        raise ConversionError(f"{path} does not exist", [path])
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(path, index_name)
        if not os.path.lexists(index_path):
            continue
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index_path} has no weight_map", [index_path])
        not_names = sorted(k for k, f in weight_map.items() if not isinstance(f, str))
        if not_names:
            raise ConversionError(f"{index_path}: the weight_map must name one file per tensor; not a file name for "
                                  f"{listing(not_names)}", not_names)
        files = sorted(set(weight_map.values()))
        outside = [f for f in files if os.path.basename(f) != f or f in ("", ".", "..")]
        if outside:
            raise ConversionError(f"{index_path} names files outside its folder: {outside}", outside)
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise ConversionError(f"{index_path} names files that do not exist: {', '.join(missing)}", missing)
        return [os.path.join(path, f) for f in files], weight_map
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)], None
    raise ConversionError(f"no weights in {path}: expected model.safetensors, pytorch_model.bin or an index of shards",
                          [path])


class Checkpoint:
    """The tensors of a folder or file: names, shapes and dtypes up front (`specs`), then the tensors file by
    file (`tensors()`)."""

    def __init__(self, path: str):
        self.path = str(path)
        self.files, weight_map = _weight_files(self.path)
        self.specs, where, twice = {}, {}, []
        for file in self.files:
            for name, spec in _file_specs(file).items():
                if name in self.specs:
                    twice.append(name)
                self.specs[name], where[name] = spec, os.path.basename(file)
        if twice:
            raise ConversionError(f"{path}: tensors stored in more than one file: {sorted(twice)}", sorted(twice))
        if weight_map is not None:
            misplaced = sorted(n for n, f in weight_map.items() if where.get(n) != f)
            if misplaced:
                raise ConversionError(f"{path}: the index lists tensors its files do not hold where it says: "
                                      f"{listing(misplaced)}", misplaced)

    @property
    def shapes(self) -> dict:
        return {name: shape for name, (shape, _) in self.specs.items()}

    def tensors(self):
        for file in self.files:
            yield from _file_tensors(file)


class ShapesOnly:
    """Tensor shapes ({name: shape}) standing in for a checkpoint: enough for a dry run on the meta device."""

    def __init__(self, shapes: dict, dtype: torch.dtype = torch.bfloat16, path: str = "the shapes"):
        self.path, self.specs = path, {name: (tuple(shape), dtype) for name, shape in shapes.items()}

    @property
    def shapes(self) -> dict:
        return {name: shape for name, (shape, _) in self.specs.items()}


def source_dtype(cfg: dict, specs: dict) -> torch.dtype:
    """The config's torch_dtype, else the dominant floating dtype of the tensors."""
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    counts = Counter()
    for shape, dtype in specs.values():
        if dtype.is_floating_point:
            counts[dtype] += math.prod(shape)
    return counts.most_common(1)[0][0] if counts else torch.float32


def parse_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    return DTYPES[dtype]


def parse_size(size) -> int:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2 * 2**30, 1000 -> 1000."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not m or float(m.group(1)) <= 0:
        raise ConversionError(f"cannot read the size {size!r}; use e.g. 5GB, 500MB or a number of bytes")
    power = "_KMGT".index(m.group(2) or "_")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


# --------------------------------------------------------------------------- key tables


def key_table(rows: str, source: str = "", target: str = "") -> dict:
    """Rows "SOURCE TARGET [PART]" (below the prefixes `source` and `target`) -> {source name: target name, or
    (target name, part) for one piece of a tensor built from several, or None for a tensor that is dropped}.
    "{}" stands for a layer index, a name ending in ".*" for its .weight and .bias, TARGET "-" drops the tensor;
    "#" starts a comment."""
    table = {}
    for row in rows.splitlines():
        fields = row.split("#", 1)[0].split()
        if not fields:
            continue
        src, dst, *part = fields
        suffixes = (".weight", ".bias") if src.endswith(".*") else ("",)
        for suffix in suffixes:
            name = source + src.removesuffix(".*") + suffix
            if dst == "-":
                table[name] = None
                continue
            out = target + dst.removesuffix(".*") + suffix
            table[name] = (out, part[0]) if part else out
    return table


_LAYER_INDEX = re.compile(r"(^|\.)(layers|layer|blocks)\.(\d+)\.")


def template(name: str):
    """'a.layers.3.b' -> ('a.layers.{}.b', '3'); a name without a layer index -> (name, None)."""
    m = _LAYER_INDEX.search(name)
    if m is None:
        return name, None
    return f"{name[:m.start()]}{m.group(1)}{m.group(2)}.{{}}.{name[m.end():]}", m.group(3)


def fill(name_template: str, index) -> str:
    return name_template if index is None else name_template.format(index)


class Rules:
    """A key table plus `fixes`: target template -> function({part: tensor}) that builds the target from its
    parts (returning a tensor, or {target template: tensor} for several). A target without a fix has a single
    part "". Source names starting with one of `ignore` are skipped."""

    def __init__(self, table: dict, fixes: dict | None = None, ignore=()):
        self.table, self.ignore = table, tuple(ignore)
        self.parts = defaultdict(dict)  # target template -> {part: source template}
        for source, entry in table.items():
            if entry is not None:
                target, part = entry if isinstance(entry, tuple) else (entry, "")
                self.parts[target][part] = source
        self.fixes = {t: f for t, f in (fixes or {}).items() if t in self.parts}


class Mapper:
    """Feeds source tensors through Rules; yields each target as soon as all its parts have arrived."""

    def __init__(self, rules: Rules):
        self.rules, self.pending, self.origins = rules, {}, {}
        self.unknown, self.failed = [], []

    def feed(self, name: str, tensor: torch.Tensor) -> list:
        """[(target name, tensor, source names)] completed by this tensor."""
        if self.rules.ignore and name.startswith(self.rules.ignore):
            return []
        name_template, index = template(name)
        if name_template not in self.rules.table:
            self.unknown.append(name)
            return []
        entry = self.rules.table[name_template]
        if entry is None:
            return []  # a derived buffer or an unused tensor
        target, part = entry if isinstance(entry, tuple) else (entry, "")
        parts = self.pending.setdefault((target, index), {})
        parts[part] = tensor
        self.origins.setdefault((target, index), []).append(name)
        if len(parts) < len(self.rules.parts[target]):
            return []
        del self.pending[(target, index)]
        return self._assemble(target, index, parts)

    def _assemble(self, target, index, parts) -> list:
        fix, origin = self.rules.fixes.get(target), self.origins.pop((target, index))
        try:
            out = fix(parts) if fix else parts[""]
        except (RuntimeError, ValueError, IndexError) as err:
            self.failed.append(f"{', '.join(origin)}: {err}")
            return []
        outs = out.items() if isinstance(out, dict) else [(target, out)]
        return [(fill(t, index), tensor, origin) for t, tensor in outs]

    def incomplete(self) -> list:
        """Source names of the missing parts of targets that were started but never completed."""
        return sorted(fill(self.rules.parts[t][p], i) for (t, i), parts in self.pending.items()
                      for p in self.rules.parts[t] if p not in parts)

    def pending_targets(self) -> set:
        return {fill(t, i) for t, i in self.pending}


# --------------------------------------------------------------------------- the dry run


def _raise_problems(problems: dict, where: str):
    problems = {kind: names for kind, names in problems.items() if names}
    if problems:
        lines = [f"  {kind} ({len(names)}): {listing(names)}" for kind, names in problems.items()]
        raise ConversionError(f"cannot convert {where}:\n" + "\n".join(lines),
                              [n for names in problems.values() for n in names])


def plan(sources, expected=None, fresh_ok=(), where="the checkpoint"):
    """Convert shapes only (meta tensors) so that every problem is found before anything is written.
    `sources` is [(checkpoint, rules)]; `expected` {target: shape} when known. Returns {target: shape} and the
    expected targets no source provides that match a `fresh_ok` pattern (to be initialised fresh)."""
    problems, produced, origins, pending = defaultdict(list), {}, {}, set()
    for source, rules in sources:
        mapper = Mapper(rules)
        for name, (shape, dtype) in source.specs.items():
            for target, tensor, origin in mapper.feed(name, torch.empty(shape, dtype=dtype, device="meta")):
                if target in produced:
                    problems["produced twice"].append(target)
                produced[target], origins[target] = tuple(tensor.shape), origin
        problems["unknown tensors"] += mapper.unknown
        problems["missing tensors"] += mapper.incomplete()
        problems["cannot convert"] += mapper.failed
        pending |= mapper.pending_targets()
    fresh = []
    if expected is not None:
        for target, shape in produced.items():
            if target not in expected:
                problems["unknown tensors"] += origins[target]
            elif expected[target] != shape:
                problems["shape mismatch"].append(f"{', '.join(origins[target])} -> {target}: "
                                                  f"got {list(shape)}, expected {list(expected[target])}")
        for target in expected:
            if target in produced or target in pending:
                continue
            if any(fnmatch.fnmatchcase(target, pattern) for pattern in fresh_ok):
                fresh.append(target)
            else:
                problems["missing tensors"].append(_source_names(target, sources))
    _raise_problems(problems, where)
    return produced, fresh


def _source_names(target: str, sources) -> str:
    """The source names a missing target is built from (or the target itself when no table names it)."""
    target_template, index = template(target)
    for _, rules in sources:
        if target_template in rules.parts:
            return ", ".join(fill(s, index) for s in rules.parts[target_template].values())
    return target


# --------------------------------------------------------------------------- writing


def progress_bar(total: int, desc: str, quiet: bool = False) -> tqdm:
    """A tqdm bar over bytes on stderr, as huggingface_hub shows downloads: silent with `quiet`, with
    HF_HUB_DISABLE_PROGRESS_BARS=1, or when stderr is not a terminal."""
    disabled = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").upper() in ("1", "ON", "YES", "TRUE")
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                disable=True if quiet or disabled else None)


class ShardWriter:
    """Writes tensors as they come in shards of at most `max_bytes` (a larger tensor gets a shard of its own),
    then names them HF-style and writes the index; a single safetensors shard is plain model.safetensors."""

    def __init__(self, folder: str, max_bytes: int, fmt: str = "safetensors", progress=None):
        self.folder, self.max_bytes, self.fmt, self.progress = folder, max_bytes, fmt, progress
        self.shard, self.shard_bytes, self.files = {}, 0, []
        self.num_tensors = self.num_params = self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor):
        tensor = tensor.detach().clone(memory_format=torch.contiguous_format)  # own storage, no mmap views
        size = tensor.numel() * tensor.element_size()
        if self.shard and self.shard_bytes + size > self.max_bytes:
            self._flush()
        self.shard[name] = tensor
        self.shard_bytes += size
        self.num_tensors, self.num_params, self.total_bytes = (
            self.num_tensors + 1, self.num_params + tensor.numel(), self.total_bytes + size)
        if self.progress is not None:
            self.progress.update(size)

    def _flush(self):
        path = os.path.join(self.folder, f".shard-{len(self.files) + 1:05d}.tmp")
        if self.fmt == "safetensors":
            save_file(self.shard, path, metadata={"format": "pt"})
        else:
            torch.save(self.shard, path)
        self.files.append((path, sorted(self.shard)))
        self.shard, self.shard_bytes = {}, 0

    def close(self) -> set:
        if self.shard or not self.files:
            self._flush()
        base, ext = ("model", "safetensors") if self.fmt == "safetensors" else ("pytorch_model", "bin")
        count, weight_map = len(self.files), {}
        for i, (path, names) in enumerate(self.files, 1):
            single = count == 1 and self.fmt == "safetensors"
            final = f"{base}.{ext}" if single else f"{base}-{i:05d}-of-{count:05d}.{ext}"
            os.replace(path, os.path.join(self.folder, final))
            weight_map |= dict.fromkeys(names, final)
        if len(weight_map) and (count > 1 or self.fmt != "safetensors"):
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(self.folder, f"{base}.{ext}.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        return set(weight_map)


def planned_bytes(planned: dict, dtype: torch.dtype) -> int:
    """What the planned tensors ({name: shape}) take once written in `dtype`: the progress bar's total."""
    return sum(math.prod(shape) for shape in planned.values()) * dtype.itemsize


def write_tensors(sources, writer: ShardWriter, dtype: torch.dtype, planned, extra=None):
    """Stream every source through its rules into the writer, casting floating tensors to `dtype`; the names
    written must be exactly the `planned` ones. `extra` holds tensors that no source provides."""
    for source, rules in sources:
        mapper = Mapper(rules)
        for name, tensor in source.tensors():
            for target, out, _ in mapper.feed(name, tensor):
                writer.add(target, out.to(dtype) if out.is_floating_point() else out)
        if mapper.unknown or mapper.pending or mapper.failed:  # the files changed since they were planned
            raise ConversionError(f"{source.path} changed during conversion", mapper.unknown + mapper.incomplete())
    for target, tensor in (extra or {}).items():
        writer.add(target, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    written = writer.close()
    if written != set(planned):
        raise ConversionError(f"wrote other tensors than planned: missing {listing(sorted(set(planned) - written))}, "
                              f"unplanned {listing(sorted(written - set(planned)))}")


def check_destination(dst, force: bool, *sources):
    """DST must be neither a source, nor inside one, nor contain one, after resolving symbolic links (else
    --force would replace the real source); an existing DST needs `force`."""
    real_dst = os.path.realpath(dst)
    for src in sources:
        real_src = os.path.realpath(src)
        if real_src == real_dst:
            raise ConversionError(f"the destination {dst} is the source {src}" +
                                  (f" (both are {real_src})" if str(src) != str(dst) else ""))
        if real_dst.startswith(real_src.rstrip(os.sep) + os.sep):
            raise ConversionError(f"the destination {dst} is inside the source {src}")
        if real_src.startswith(real_dst.rstrip(os.sep) + os.sep):
            raise ConversionError(f"the destination {dst} would replace the source {src}, which lies inside it")
    if os.path.lexists(dst) and not force:
        raise ConversionError(f"{os.path.abspath(dst)} already exists; pass --force to replace it")


@contextlib.contextmanager
def output_folder(dst, force: bool):
    """model_folder.staged_folder with the converter's errors: an existing DST without --force, and a full disk
    (or quota, or read-only file system) named as such. The folder and its files get the user's umask."""
    if os.path.lexists(dst) and not force:
        raise ConversionError(f"{os.path.abspath(dst)} already exists; pass --force to replace it")
    try:
        with staged_folder(dst, replace=force) as tmp:
            yield tmp
    except OSError as err:
        if err.errno not in _WRITE_ERRORS:
            raise
        raise ConversionError(f"cannot write {os.path.abspath(dst)}: {err.strerror or err}; no partial output "
                              f"was left behind", [str(dst)]) from None


@dataclasses.dataclass
class ConversionResult:
    dst: str
    num_tensors: int
    num_params: int
    source: str  # what was converted, e.g. "XComposer2"
    config: object  # our XComposerConfig, or the upstream config.json dict of an export
    layout: str = "ours"

    @property
    def summary(self) -> str:
        where = self.dst if self.layout == "ours" else f"{self.dst} ({self.layout} layout)"
        return f"converted {self.num_tensors} tensors ({self.num_params:,} parameters) from {self.source} to {where}"
