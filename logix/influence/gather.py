"""Influence under torch.distributed: each rank scores a round-robin share of the shards, and
the parts are gathered back in manifest order (full matrix) or merged (top-k)."""

from __future__ import annotations

import torch

from logix import distributed
from logix.storage.reader import LogReader


def merge_full(local: dict, reader: LogReader) -> dict:
    """Gather every rank's columns and lay them out in manifest shard order."""
    parts = distributed.all_gather_objects(
        (local["tgt_ids"], local["influence"], local.get("groups", {})))
    world = len(parts)
    cursor = [0] * world
    ids, columns, groups = [], [], {name: [] for name in parts[0][2]}
    for i, shard in enumerate(reader.shards):
        r = i % world  # the round-robin owner, as in own_part
        a, b = cursor[r], cursor[r] + shard.rows
        cursor[r] = b
        ids.extend(parts[r][0][a:b])
        columns.append(parts[r][1][:, a:b])
        for name in groups:
            groups[name].append(parts[r][2][name][:, a:b])
    merged = {"src_ids": local["src_ids"], "tgt_ids": ids, "influence": torch.cat(columns, 1),
              "meta": local["meta"]}
    if groups:
        merged["groups"] = {name: torch.cat(cols, 1) for name, cols in groups.items()}
    return merged


def merge_topk(local: dict, k: int) -> dict:
    """Merge every rank's top-k and bottom-k candidates into the global ones."""
    parts = distributed.all_gather_objects(local)

    def merge(result_parts, ids_key, scores_key, largest):
        scores = torch.cat([p[scores_key] for p in result_parts], 1)
        ids = [sum((p[ids_key][q] for p in result_parts), []) for q in range(scores.shape[0])]
        values, index = torch.topk(scores, min(k, scores.shape[1]), dim=1, largest=largest)
        return [[ids[q][i] for i in row] for q, row in enumerate(index.tolist())], values

    merged = {"src_ids": local["src_ids"], "meta": local["meta"]}
    merged["top_ids"], merged["top_scores"] = merge(parts, "top_ids", "top_scores", True)
    merged["bottom_ids"], merged["bottom_scores"] = merge(parts, "bottom_ids", "bottom_scores",
                                                          False)
    if "groups" in local:
        merged["groups"] = {}
        for name in local["groups"]:
            group_parts = [p["groups"][name] for p in parts]
            entry = {}
            entry["top_ids"], entry["top_scores"] = merge(group_parts, "top_ids", "top_scores",
                                                          True)
            entry["bottom_ids"], entry["bottom_scores"] = merge(group_parts, "bottom_ids",
                                                                "bottom_scores", False)
            merged["groups"][name] = entry
    return merged


def own_part(reader: LogReader) -> LogReader:
    """This rank's share of the shards (round robin) under torch.distributed."""
    part = LogReader(reader.project_dir, reader.manifest, reader.block_rows, reader.checkpoint,
                     reader.verify)
    part.shards = reader.shards[distributed.rank()::distributed.world_size()]
    return part
