"""Shards written past the page cache (O_DIRECT) hold exactly the bytes a buffered write would,
start their rows on a page boundary, and fall back to the page cache where O_DIRECT is refused."""

import errno
import fcntl
import os

import pytest
import torch

import logix.storage.direct_io as direct_io
from logix.storage.direct_io import PAGE, aligned_empty, write_direct
from logix.storage.format import (CHECKSUM, DATA_IDS_KEY, GRAD_KEY, atomic_write, read_header,
                                  safetensors_header, tensor_bytes)
from logix.storage.reader import LogReader, map_shard


def shard_parts(rows=37, dim=50, dtype=torch.float32):
    """A header padded to PAGE and page-aligned rows whose bytes end mid-page."""
    data = aligned_empty(rows, dim, dtype)
    data.copy_(torch.randn(rows, dim))
    header = safetensors_header({GRAD_KEY: (dtype, [rows, dim])},
                                {DATA_IDS_KEY: str(list(range(rows)))}, align=PAGE)
    return header, data


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aligned_empty_starts_on_a_page(dtype):
    for rows, dim in [(1, 3), (64, 4096), (2048, 513)]:
        t = aligned_empty(rows, dim, dtype)
        assert t.shape == (rows, dim) and t.dtype == dtype and t.data_ptr() % PAGE == 0


def test_a_direct_write_holds_the_bytes_of_a_buffered_one(tmp_path):
    header, data = shard_parts()
    assert len(header) % PAGE == 0 and (len(tensor_bytes(data)) % PAGE) != 0  # a tail page
    direct = write_direct(str(tmp_path / "d.safetensors"), header, tensor_bytes(data), CHECKSUM)
    buffered = atomic_write(str(tmp_path / "b.safetensors"), header, tensor_bytes(data))
    if direct is None:  # a file system without O_DIRECT: the writer falls back like this
        direct = atomic_write(str(tmp_path / "d.safetensors"), header, tensor_bytes(data))
    assert direct == buffered
    assert (tmp_path / "d.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    _, data_start, _ = read_header(str(tmp_path / "d.safetensors"))
    assert data_start % PAGE == 0
    ids, rows = map_shard(str(tmp_path / "d.safetensors"), 50)
    assert torch.equal(rows, data) and ids == list(range(37))
    assert not os.path.exists(str(tmp_path / "d.safetensors.tmp"))


def test_an_unaligned_buffer_or_header_is_left_to_the_page_cache(tmp_path):
    header, data = shard_parts()
    flat = tensor_bytes(data)
    assert write_direct(str(tmp_path / "a"), header, flat[8:], CHECKSUM) is None
    assert write_direct(str(tmp_path / "b"), header[:-8], flat, CHECKSUM) is None
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("refuses", ["open", "write"])
def test_a_file_system_refusing_o_direct_gets_a_buffered_log(new_run, monkeypatch, refuses):
    real_open, real_write, refused = os.open, os.write, []

    def no_direct_open(path, flags, *args):
        if flags & os.O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def no_direct_write(fd, data):  # takes the page-sized header, refuses the rows
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT and len(data) > PAGE:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    if refuses == "open":
        monkeypatch.setattr(direct_io.os, "open", no_direct_open)
    else:
        monkeypatch.setattr(direct_io.os, "write", no_direct_write)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 16)  # unprojected rows of 1,024+ numbers: shards over a page
    run = new_run(shard_rows=4)
    run.watch(model)
    run.setup({"grad": ["log"]})
    run.save(True)
    x = torch.randn(10, 64)
    want = []
    for start in range(0, 10, 5):
        with run(data_id=list(range(start, start + 5))):
            model(x[start:start + 5]).pow(2).sum().backward()
        want.append(run.get_log(copy=True).grads)
        model.zero_grad()
    run.finalize()
    ids, rows = LogReader(run.project_dir).read_all()
    assert ids == list(range(10)) and torch.equal(rows, torch.cat(want))
    assert len(refused) == 3  # every shard tried O_DIRECT first
