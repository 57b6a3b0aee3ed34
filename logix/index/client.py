"""Ask a running `logix serve` for the most influential training examples (standard library
only: no FAISS, no index, no shards on this side).

    from logix.index import client
    result = client.search("http://127.0.0.1:8766/", run.get_log(), k=10)
    result["top_ids"], result["top_scores"]   # as Attributor.search, scores a float32 tensor
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import torch

from logix.errors import UsageError


def search(url: str, query, k: int = 10, timeout: float = 60.0, **options) -> dict:
    """The service's answer for `query`: a StepRows (its rows are sent as JSON) or the path of a
    `StepRows.save` file inside a folder the service reads (`--queries-dir`; the path is read by
    the service, on its machine). options: bottom, candidates, index, mode, hessian, nprobe,
    ef. Returns {"src_ids", "top_ids", "top_scores"[, "bottom_ids", "bottom_scores"], "meta"},
    scores as float32 tensors (NaN where a query had fewer than k answers)."""
    from logix.log import StepRows

    body = {"k": k, **{key: v for key, v in options.items() if v is not None}}
    if isinstance(query, (str, os.PathLike)):
        body["path"] = os.path.abspath(os.fspath(query))
    elif isinstance(query, StepRows):
        body["rows"] = query.grads.float().tolist()
        body["ids"] = [i if isinstance(i, (str, int)) else str(i) for i in query.data_ids]
        body["projection"] = dict(query.projection or {})
    else:
        raise UsageError(f"query must be a StepRows or the path of a StepRows.save file, got "
                         f"{type(query).__name__}.")
    answer = _post(url.rstrip("/") + "/api/search", body, timeout)
    for side in ("top", "bottom"):
        if f"{side}_scores" in answer:
            answer[f"{side}_scores"] = _scores(answer[f"{side}_scores"], k)
    return answer


def health(url: str, timeout: float = 10.0) -> dict:
    """The service's project, rows and indexes."""
    return _request(urllib.request.Request(url.rstrip("/") + "/api/health"), timeout)


def _post(url: str, body: dict, timeout: float) -> dict:
    data = json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    return _request(request, timeout)


def _request(request, timeout: float) -> dict:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", "")
        except ValueError:
            message = ""
        raise UsageError(f"logix serve answered {e.code}: {message or e.reason}") from None
    except urllib.error.URLError as e:
        raise UsageError(f"Cannot reach logix serve at {request.full_url}: {e.reason}. Is it "
                         "running (logix serve PROJECT)?") from None


def _scores(rows, k: int) -> torch.Tensor:
    out = torch.full((len(rows), k), float("nan"))
    for q, row in enumerate(rows):
        values = [float("nan") if v is None else v for v in row]
        out[q, :len(values)] = torch.tensor(values, dtype=torch.float32)
    return out
