"""Score files: influence scores saved as one safetensors file (docs/format.md, "Score files").

    <name>.safetensors
      tensor "influence"   [n_test, n_train], float32; row q, column i is the score of training
                           example tgt_ids[i] for query src_ids[q] (positive: helpful)
      tensor "influence/<group>" (optional, one per influence group) [n_test, n_train]
      metadata "format": "logix-scores", "format_version": "1",
               "src_ids": JSON list (n_test), "tgt_ids": JSON list (n_train),
               "meta": JSON object (optional: mode, hessian, project, fingerprint, ...),
               "describes": JSON {"fingerprint", "rows", "ids"}: the training log scored

Per-token scores (`logix.text.token_influence`) add tensor "token_influence" [n_tokens, n_train]
and metadata "token_query" / "token_text" [/ "token_completion"] (docs/format.md, "Per-token
scores"). Training-side per-token scores (`logix.text.train_token_scores`, attached as
"train_tokens") add tensor "train_token_influence" [their tokens, back to back] and metadata
"train_tokens" (one object per query and training example: query row, training id, token texts,
which tokens were in the loss, the score).

`save_scores` writes what `compute_influence_all` (or `token_influence`) returns; `load_scores` reads it back whole and
`open_scores` memory-maps it so one query's row can be read without loading the matrix.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor

from logix.errors import LogFormatError, UsageError
from logix.storage.format import (atomic_write, commit, safetensors_header, temporary_path,
                                  tensor_bytes)
from logix.storage.manifest import describes, enclosing_project, ids_digest
from logix.storage.state import DESCRIBES_KEY, check_describes, recorded_describes

SCORES_FORMAT = "logix-scores"
SCORES_FORMAT_VERSION = 1
INFLUENCE_KEY = "influence"
GROUP_PREFIX = "influence/"  # + group name: the scores of one influence group
GROUPS_KEY = "groups"
SRC_IDS_KEY = "src_ids"
TGT_IDS_KEY = "tgt_ids"
META_KEY = "meta"
# Per-token scores (optional): tensor TOKEN_INFLUENCE_KEY [n_tokens, n_train], one row per query
# token; metadata TOKEN_QUERY_KEY (JSON list, the query row of each token row, ascending) and
# TOKEN_TEXT_KEY (JSON list of the tokens' strings). A query's token rows sum to its row.
TOKEN_INFLUENCE_KEY = "token_influence"
TOKEN_QUERY_KEY = "token_query"
TOKEN_TEXT_KEY = "token_text"
TOKEN_COMPLETION_KEY = "token_completion"  # optional JSON list of bools: token in the completion
# Training-side per-token scores (optional): tensor TRAIN_TOKEN_INFLUENCE_KEY, the token scores of
# every pair back to back; metadata TRAIN_TOKENS_KEY, a JSON list of pairs {"query": query row,
# "train": training id, "text": [token strings], "in_loss": [bools], "score": float}, in the
# tensor's order (a pair's tokens sum to its score).
TRAIN_TOKEN_INFLUENCE_KEY = "train_token_influence"
TRAIN_TOKENS_KEY = "train_tokens"


def save_scores(path: str, result: Mapping[str, Any], meta: Optional[Mapping] = None) -> str:
    """Write {"influence": [n_test, n_train], "src_ids": [...], "tgt_ids": [...]} to `path`
    atomically (temporary name, fsync, rename). The result's "meta" is kept; `meta`: extra
    JSON-safe facts (project, ...) that override it.
    Returns the path."""
    missing = [k for k in (INFLUENCE_KEY, SRC_IDS_KEY, TGT_IDS_KEY) if k not in result]
    if missing:
        raise LogFormatError(f"save_scores needs the keys {INFLUENCE_KEY!r}, {SRC_IDS_KEY!r} and "
                             f"{TGT_IDS_KEY!r} (what compute_influence_all returns); missing "
                             f"{missing}.")
    src_ids, tgt_ids = list(result[SRC_IDS_KEY]), list(result[TGT_IDS_KEY])
    tensors = {INFLUENCE_KEY: result[INFLUENCE_KEY]}
    for name, group in (result.get(GROUPS_KEY) or {}).items():
        tensors[GROUP_PREFIX + str(name)] = group
    for key, scores in tensors.items():
        if not isinstance(scores, Tensor) or scores.dim() != 2:
            raise LogFormatError(f"{key!r} must be a 2-D tensor [n_test, n_train], got "
                                 f"{_describe(scores)}.")
        if tuple(scores.shape) != (len(src_ids), len(tgt_ids)):
            raise LogFormatError(f"{key!r} of shape {tuple(scores.shape)} does not match "
                                 f"{len(src_ids)} src_ids x {len(tgt_ids)} tgt_ids.")
    metadata = {"format": SCORES_FORMAT, "format_version": str(SCORES_FORMAT_VERSION),
                SRC_IDS_KEY: _json(src_ids, SRC_IDS_KEY), TGT_IDS_KEY: _json(tgt_ids, TGT_IDS_KEY)}
    meta = {**(result.get(META_KEY) or {}), **(meta or {})}  # the result's own meta, then `meta`
    if meta:
        metadata[META_KEY] = _json(meta, META_KEY)
    metadata[DESCRIBES_KEY] = _json(describes(meta.get("fingerprint"), tgt_ids), DESCRIBES_KEY)
    if result.get(TOKEN_INFLUENCE_KEY) is not None:
        tensors[TOKEN_INFLUENCE_KEY] = _token_rows(result, len(src_ids), len(tgt_ids), metadata)
    if result.get(TRAIN_TOKENS_KEY):
        tensors[TRAIN_TOKEN_INFLUENCE_KEY] = _train_tokens(result[TRAIN_TOKENS_KEY], src_ids,
                                                           metadata)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    header = safetensors_header({k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()},
                                metadata)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # header and tensors stream to disk: no serialised copy of a large matrix
    atomic_write(path, header, *(tensor_bytes(v) for v in tensors.values()))
    return path


def _token_rows(result: Mapping[str, Any], n_test: int, n_train: int, metadata: dict) -> Tensor:
    """Check per-token scores (logix.text.token_influence) and put their ids in `metadata`."""
    scores, owner = result[TOKEN_INFLUENCE_KEY], list(result.get(TOKEN_QUERY_KEY) or [])
    text = list(result.get(TOKEN_TEXT_KEY) or [])
    if not isinstance(scores, Tensor) or scores.dim() != 2 or scores.shape[1] != n_train or \
            len(owner) != scores.shape[0] or len(text) != scores.shape[0]:
        raise LogFormatError(f"{TOKEN_INFLUENCE_KEY!r} must be [n_tokens, {n_train}] with one "
                             f"{TOKEN_QUERY_KEY!r} and {TOKEN_TEXT_KEY!r} entry per row; got "
                             f"{_describe(scores)}, {len(owner)} and {len(text)}.")
    if owner != sorted(owner) or any(not 0 <= q < n_test for q in owner):
        raise LogFormatError(f"{TOKEN_QUERY_KEY!r} must be ascending query rows in [0, {n_test})."
                             )
    metadata[TOKEN_QUERY_KEY] = _json([int(q) for q in owner], TOKEN_QUERY_KEY)
    metadata[TOKEN_TEXT_KEY] = _json([str(t) for t in text], TOKEN_TEXT_KEY)
    completion = result.get(TOKEN_COMPLETION_KEY)
    if completion is not None:
        if len(completion) != scores.shape[0]:
            raise LogFormatError(f"{TOKEN_COMPLETION_KEY!r} needs one flag per token row, got "
                                 f"{len(completion)} for {scores.shape[0]}.")
        metadata[TOKEN_COMPLETION_KEY] = _json([bool(c) for c in completion],
                                               TOKEN_COMPLETION_KEY)
    return scores


def _train_tokens(pairs, src_ids: List, metadata: dict) -> Tensor:
    """Check training-side per-token scores (logix.text.train_token_scores results) and put
    their description in `metadata`; returns their scores back to back."""
    described, values = [], []
    for pair in pairs:
        scores, text = list(pair.get("token_scores") or []), list(pair.get("token_text") or [])
        flags = list(pair.get("token_in_loss") or [])
        if pair.get("query_id") not in src_ids or not scores or \
                not len(scores) == len(text) == len(flags):
            raise LogFormatError(f"{TRAIN_TOKENS_KEY!r} entries must be train_token_scores() "
                                 "results of the file's queries (one text, in-loss flag and score "
                                 f"per token); got one for query {pair.get('query_id')!r} with "
                                 f"{len(scores)} scores, {len(text)} texts, {len(flags)} flags.")
        described.append({"query": src_ids.index(pair["query_id"]), "train": pair["train_id"],
                          "text": [str(t) for t in text], "in_loss": [bool(f) for f in flags],
                          "score": float(pair["score"])})
        values += [float(v) for v in scores]
    metadata[TRAIN_TOKENS_KEY] = _json(described, TRAIN_TOKENS_KEY)
    return torch.tensor(values, dtype=torch.float32)


class ScoreFileWriter:
    """Writes a score file column block by column block, for matrices too large for memory.

    The header is written first (shapes are known up front), the data region is memory-mapped,
    each streamed block fills its columns, and `close` fsyncs and renames the file into place;
    `abort` removes the temporary file.
    """

    def __init__(self, path: str, shapes: Dict[str, tuple], src_ids: List, tgt_ids: List,
                 meta: Optional[Mapping] = None) -> None:
        import numpy as np

        self.path = os.fspath(path)
        metadata = {"format": SCORES_FORMAT, "format_version": str(SCORES_FORMAT_VERSION),
                    SRC_IDS_KEY: _json(list(src_ids), SRC_IDS_KEY),
                    TGT_IDS_KEY: _json(list(tgt_ids), TGT_IDS_KEY)}
        if meta:
            metadata[META_KEY] = _json(dict(meta), META_KEY)
        metadata[DESCRIBES_KEY] = _json(describes((meta or {}).get("fingerprint"),
                                                  list(tgt_ids)), DESCRIBES_KEY)
        header = safetensors_header({name: (torch.float32, shape) for name, shape in
                                     shapes.items()}, metadata)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._tmp = temporary_path(self.path)
        offset = 0
        starts = {}
        for name, shape in shapes.items():
            starts[name] = len(header) + offset
            offset += 4 * int(np.prod(shape))
        with open(self._tmp, "wb") as f:
            f.write(header)
            f.truncate(len(header) + offset)
        self._maps = {}
        for name, shape in shapes.items():
            if int(np.prod(shape)):
                self._maps[name] = np.memmap(self._tmp, dtype=np.float32, mode="r+",
                                             offset=starts[name], shape=tuple(shape))

    def write_columns(self, name: str, start: int, block: Tensor) -> None:
        """block [n_test, n] goes to columns [start, start + n) of tensor `name`."""
        if name in self._maps:
            self._maps[name][:, start:start + block.shape[1]] = \
                block.detach().to("cpu", torch.float32).numpy()

    def close(self) -> str:
        for array in self._maps.values():
            array.flush()
        self._maps.clear()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        commit(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._maps.clear()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


class ScoreFile:
    """A memory-mapped score file: ids and shape from the header, rows read on demand.
    `close()` (or leaving a `with` block) releases the mapping.

    project_dir: the project whose log the scores must describe (default: the project folder
    the file sits in, if any); a file computed from another log is refused, since its ids would
    be shown with this project's content. Files of earlier releases record no log and are read
    unverified."""

    def __init__(self, path: str, group: Optional[str] = None,
                 project_dir: Optional[str] = None) -> None:
        from safetensors import SafetensorError, safe_open

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise LogFormatError(f"{self.path!r} is not a file; pass a score file written by "
                                 "save_scores or compute_influence_all(..., out=path).")
        try:
            self._file = safe_open(self.path, framework="pt")
            metadata = self._file.metadata() or {}
            keys = list(self._file.keys())
        except (SafetensorError, OSError) as e:
            raise LogFormatError(f"{self.path!r} is not a readable safetensors file: {e}") from e
        self._slice = None
        try:
            self._check(metadata, keys, group)
            self._check_log(metadata, project_dir or enclosing_project(self.path))
        except BaseException:
            self.close()
            raise

    def _check(self, metadata: dict, keys: List[str], group: Optional[str]) -> None:
        if metadata.get("format", SCORES_FORMAT) != SCORES_FORMAT:
            raise UsageError(f"{self.path!r} is a {metadata['format']!r} file, not a score "
                             f"file ('format': {SCORES_FORMAT!r}).")
        version = metadata.get("format_version", str(SCORES_FORMAT_VERSION))
        if not version.isdigit() or int(version) > SCORES_FORMAT_VERSION:
            raise LogFormatError(f"{self.path!r} has score format version {version}; this LogIX "
                                 f"reads versions up to {SCORES_FORMAT_VERSION}. Upgrade LogIX.")
        if INFLUENCE_KEY not in keys:
            raise UsageError(f"{self.path!r} has no {INFLUENCE_KEY!r} tensor (it holds "
                             f"{keys[:5]}); it is not a LogIX score file.")
        self.groups = sorted(k[len(GROUP_PREFIX):] for k in keys if k.startswith(GROUP_PREFIX))
        self.key = INFLUENCE_KEY if group is None else GROUP_PREFIX + group
        if self.key not in keys:
            raise UsageError(f"{self.path!r} has no scores of group {group!r}; its groups: "
                             f"{self.groups or 'none'}.")
        self.src_ids = self._ids(metadata, SRC_IDS_KEY)
        self.tgt_ids = self._ids(metadata, TGT_IDS_KEY)
        try:
            self.meta = json.loads(metadata[META_KEY]) if META_KEY in metadata else {}
        except json.JSONDecodeError as e:
            raise LogFormatError(f"{self.path!r}: metadata {META_KEY!r} is not JSON: {e}") from e
        self._slice = self._file.get_slice(self.key)
        self.shape = tuple(self._slice.get_shape())
        if len(self.shape) != 2 or self.shape != (len(self.src_ids), len(self.tgt_ids)):
            raise LogFormatError(f"{self.path!r}: {self.key!r} has shape {list(self.shape)} "
                                 f"but the metadata names {len(self.src_ids)} src_ids and "
                                 f"{len(self.tgt_ids)} tgt_ids.")

    def _check_log(self, metadata: dict, project_dir: Optional[str]) -> None:
        self.describes = recorded_describes(self.path, metadata)
        if self.describes is None:
            return
        if self.describes["rows"] != len(self.tgt_ids) or \
                self.describes["ids"] != ids_digest(self.tgt_ids):
            raise LogFormatError(f"{self.path!r}: its {TGT_IDS_KEY!r} are not the ones the scores "
                                 f"were computed for ({self.describes['rows']} ids, digest "
                                 f"{self.describes['ids']}); the file was edited or damaged. "
                                 "Compute the scores again.")
        if project_dir is not None:
            check_describes(self.path, self.describes, project_dir,
                            "Read it with the project it was computed from (keep it in that "
                            "project's folder, or pass that folder: --content DIR, "
                            "project_dir=), or compute the scores again from this log.")

    def row(self, query: int) -> Tensor:
        """Scores of query `query` against every training example, [n_train] float32."""
        self._check_open()
        return self._slice[query:query + 1][0].float()

    def read_all(self, group: Optional[str] = None) -> Tensor:
        """The whole [n_test, n_train] matrix (of `group`, default this file's opened one)."""
        self._check_open()
        key = self.key if group is None else GROUP_PREFIX + group
        return self._file.get_tensor(key).float()

    def close(self) -> None:
        """Release the file and its memory map; reading afterwards raises UsageError."""
        if self._file is not None:
            self._file.__exit__(None, None, None)
            self._file = self._slice = None

    def __enter__(self) -> "ScoreFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._file is None:
            raise UsageError(f"Score file {self.path!r} is closed; open it again with "
                             "open_scores(path).")

    def _ids(self, metadata: dict, key: str) -> List:
        if key not in metadata:
            raise LogFormatError(f"{self.path!r} has no {key!r} in its metadata; it is not a "
                                 "LogIX score file.")
        try:
            ids = json.loads(metadata[key])
        except json.JSONDecodeError as e:
            raise LogFormatError(f"{self.path!r}: metadata {key!r} is not JSON: {e}") from e
        if not isinstance(ids, list):
            raise LogFormatError(f"{self.path!r}: metadata {key!r} must be a JSON list.")
        return ids


def open_scores(path: str, group: Optional[str] = None,
                project_dir: Optional[str] = None) -> ScoreFile:
    """Memory-map a score file; `group` picks the scores of one influence group. A file computed
    from another log than `project_dir`'s (default: the project folder the file sits in) is
    refused with a LogFormatError."""
    return ScoreFile(path, group, project_dir)


def load_scores(path: str, project_dir: Optional[str] = None) -> Dict[str, Any]:
    """{"influence": [n_test, n_train] float32, "src_ids": [...], "tgt_ids": [...], "meta": {},
    and "groups": {name: [n_test, n_train]} when the file has groups}: the dict
    `compute_influence_all` returned, read back."""
    with ScoreFile(path, project_dir=project_dir) as scores:
        out = {INFLUENCE_KEY: scores.read_all(), SRC_IDS_KEY: scores.src_ids,
               TGT_IDS_KEY: scores.tgt_ids, META_KEY: scores.meta}
        if scores.groups:
            out[GROUPS_KEY] = {g: scores.read_all(g) for g in scores.groups}
        if TOKEN_INFLUENCE_KEY in scores._file.keys():
            metadata = scores._file.metadata()
            out[TOKEN_INFLUENCE_KEY] = scores._file.get_tensor(TOKEN_INFLUENCE_KEY).float()
            out[TOKEN_QUERY_KEY] = json.loads(metadata[TOKEN_QUERY_KEY])
            out[TOKEN_TEXT_KEY] = json.loads(metadata[TOKEN_TEXT_KEY])
            if TOKEN_COMPLETION_KEY in metadata:
                out[TOKEN_COMPLETION_KEY] = json.loads(metadata[TOKEN_COMPLETION_KEY])
        if TRAIN_TOKEN_INFLUENCE_KEY in scores._file.keys():
            values = scores._file.get_tensor(TRAIN_TOKEN_INFLUENCE_KEY)
            out[TRAIN_TOKENS_KEY] = train_token_pairs(scores._file.metadata(), values,
                                                      out[SRC_IDS_KEY])
    return out


def train_token_pairs(metadata: Dict[str, str], values: Tensor, src_ids: List) -> List[Dict]:
    """The training-side per-token scores of a score file, as train_token_scores() returns
    them (query_id, train_id, token_text, token_scores, token_in_loss, score)."""
    try:
        pairs, start = json.loads(metadata[TRAIN_TOKENS_KEY]), 0
    except (KeyError, ValueError) as e:
        raise LogFormatError(f"{TRAIN_TOKENS_KEY} metadata is missing or not JSON: {e}") from e
    if not isinstance(pairs, list) or not all(
            isinstance(p, dict) and isinstance(p.get("text"), list)
            and isinstance(p.get("in_loss"), list) and isinstance(p.get("query"), int)
            and "train" in p and isinstance(p.get("score"), (int, float)) for p in pairs):
        raise LogFormatError(f"{TRAIN_TOKENS_KEY} must be a JSON list of objects with query, "
                             "train, text, in_loss and score (docs/format.md).")
    out = []
    for pair in pairs:
        n = len(pair["text"])
        if len(pair["in_loss"]) != n or start + n > values.numel() or \
                not 0 <= pair["query"] < len(src_ids):
            raise LogFormatError(f"{TRAIN_TOKENS_KEY} entry for training id {pair['train']!r} "
                                 "does not line up with its tokens, flags or the queries.")
        out.append({"query_id": src_ids[pair["query"]], "train_id": pair["train"],
                    "token_text": pair["text"], "token_in_loss": pair["in_loss"],
                    "token_scores": values[start:start + n].tolist(), "score": pair["score"]})
        start += n
    if start != values.numel():
        raise LogFormatError(f"{TRAIN_TOKEN_INFLUENCE_KEY} holds {values.numel()} scores for "
                             f"{start} tokens described in {TRAIN_TOKENS_KEY}.")
    return out


def top_of_row(row: Tensor, ids: List, k: int):
    """(helpful, harmful, nonfinite) of one query's scores: the k largest and k smallest finite
    scores as [{"rank", "id", "score"}], and how many scores were NaN/inf (left out)."""
    finite = torch.isfinite(row)
    index = finite.nonzero().flatten()
    values = row[index]
    k = min(k, values.numel())

    def entries(largest: bool) -> List[dict]:
        top = torch.topk(values, k, largest=largest, sorted=True)
        return [{"rank": n + 1, "id": ids[int(index[j])], "score": float(v)}
                for n, (v, j) in enumerate(zip(top.values.tolist(), top.indices.tolist()))]

    return entries(True), entries(False), int((~finite).sum())


def _json(value, key: str) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as e:
        raise LogFormatError(f"{key} must be JSON-safe (str/int ids): {e}") from e


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {list(value.shape)}"
    return type(value).__name__
