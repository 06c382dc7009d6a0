"""SAP's CPU kernels give what torch's operations give, bit for bit: the exact sampler's merge (the mask of
searchsorted + scatter) and the poisson sampler's fused tail."""

from __future__ import annotations

import logging

import pytest
import torch

from bastion import models
from bastion.defenses import sap_kernel
from bastion.defenses.sap import insert_sap, sap, sap_keep_mask
from bastion.errors import ConfigError


def _reference(c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    idx = torch.searchsorted(c, u, right=True).clamp_max_(c.shape[1] - 1)
    return torch.zeros(c.shape, dtype=torch.bool).scatter_(1, idx, True)


def _rows(n: int, d: int, r: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative weights with runs of zero-weight units (equal neighbours), and sorted draws that
    include exact hits on boundaries, zero and the row's total."""
    a = torch.rand(n, d, generator=gen, dtype=dtype).mul_(torch.rand(n, d, generator=gen, dtype=dtype) > 0.5)
    a[0] = 0  # an all-zero row
    a[1, : d - 1] = 0  # one unit holds the row
    c = a.cumsum(1)
    u = torch.rand(n, r, generator=gen, dtype=dtype).mul_(c[:, -1:])
    u[:, : min(r, d) // 3] = c[:, : min(r, d) // 3]  # draws exactly on boundaries
    u[2, -1] = c[2, -1]  # a draw at the total: clamped to the last unit
    if n > 4:  # NaN draws (a row whose sum is NaN): torch's search puts them last; in a group of four
        u[3, : r // 2] = float("nan")  # rows and in the rows after the last group
        u[-1, r // 3 :] = float("nan")
    return c, u.sort(1).values.contiguous()


@pytest.fixture
def kernel() -> None:
    if sap_kernel._load() is None:  # noqa: SLF001
        pytest.skip("no C compiler on this machine: the kernel cannot be built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "d", "r"), [(1, 1, 1), (3, 5, 40), (7, 50, 50), (37, 300, 120), (64, 1000, 1000),
                                           (6, 9, 3)])
def test_kernel_mask_is_searchsorted_mask(kernel: None, dtype: torch.dtype, n: int, d: int, r: int) -> None:
    gen = torch.Generator().manual_seed(n * 1000 + d)
    c, u = _rows(max(n, 3), d, r, dtype, gen)
    got = sap_kernel.keep_mask(c, u)
    assert got is not None
    assert torch.equal(got, _reference(c, u))


def test_sap_keep_mask_and_model_outputs_are_unchanged_by_the_kernel(kernel: None, monkeypatch) -> None:
    a = torch.relu(torch.randn(50, 700, generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(3)
    with_kernel = sap_keep_mask(a, 700)
    model = insert_sap(models.create("lenet5", seed=0).eval(), 1.0, "exact")
    x = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(4)
    out_kernel = model(x)
    monkeypatch.setenv("BASTION_SAP_KERNEL", "0")
    torch.manual_seed(3)
    assert torch.equal(sap_keep_mask(a, 700), with_kernel)
    torch.manual_seed(4)
    assert torch.equal(model(x), out_kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fraction", [0.3, 1.0, 5.0])
def test_poisson_tail_is_the_torch_operations_bit_for_bit(kernel: None, monkeypatch, dtype: torch.dtype,
                                                          fraction: float) -> None:
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(67, 5, 9, 9, generator=gen, dtype=dtype).mul_(torch.rand(67, 5, 9, 9, generator=gen) > 0.4)
    h[0] = 0  # an all-zero row
    h[1] = 0
    h[1, 2, 3, 4] = 2.5  # one unit holds the row
    h[2, 0, 0, 0] = float("inf")
    h[3, 1, 1, 1] = float("nan")  # the row's sum is NaN, and so is every unit's k
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("BASTION_SAP_KERNEL", flag)
        torch.manual_seed(11)
        outs[flag] = (sap(h, fraction, sampler="poisson"), sap(h.relu(), fraction, nonneg=True, sampler="poisson"))
    for with_kernel, without in zip(outs["1"], outs["0"], strict=True):
        assert with_kernel.dtype == dtype and with_kernel.shape == h.shape
        assert torch.equal(with_kernel.nan_to_num(7.0), without.nan_to_num(7.0))
        assert torch.equal(with_kernel.isnan(), without.isnan())
        assert torch.equal(with_kernel.signbit(), without.signbit())


def test_a_default_device_other_than_the_inputs_changes_nothing(kernel: None, monkeypatch) -> None:
    """The mask is made on the inputs' device, not on torch's default one (there: a crash)."""
    h = torch.relu(torch.randn(40, 300, generator=torch.Generator().manual_seed(2)))
    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("BASTION_SAP_KERNEL", flag)
        torch.manual_seed(9)
        with torch.device("meta"):
            outs.append(sap(h, 1.0, nonneg=True))
    assert outs[0].device.type == "cpu" and torch.equal(outs[0], outs[1])


def test_bad_switch_value_names_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("BASTION_SAP_KERNEL", "disable")
    with pytest.raises(ConfigError, match="BASTION_SAP_KERNEL='disable'"):
        sap_kernel.keep_mask(torch.ones(2, 3).cumsum(1), torch.full((2, 4), 0.5))


def test_a_bad_switch_value_fails_a_command_at_once(monkeypatch, capsys) -> None:
    from bastion.cli import main

    monkeypatch.setenv("BASTION_SAP_KERNEL", "disable")
    assert main(["list"]) == 2
    assert "BASTION_SAP_KERNEL='disable'" in capsys.readouterr().err


def test_one_thread_pool_whatever_the_batch_sizes(kernel: None, monkeypatch) -> None:
    monkeypatch.setattr(sap_kernel, "_state", {"lib": sap_kernel._load()})  # noqa: SLF001
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for n in (32, 48, 64, 200, 33):
            c, u = _rows(n, 50, 50, torch.float32, torch.Generator().manual_seed(n))
            assert torch.equal(sap_kernel.keep_mask(c, u), _reference(c, u))
    finally:
        torch.set_num_threads(before)
    assert [k for k in sap_kernel._state if k.startswith("pool")] == ["pool", "pool_size"]  # noqa: SLF001
    assert sap_kernel._state["pool_size"] == 4  # noqa: SLF001


def test_compiled_model_traces_torch_operations(kernel: None) -> None:
    """Inside torch.compile's tracing the kernels step aside: the whole graph is traced."""
    model = insert_sap(models.create("lenet5", seed=0).eval(), 1.0, "exact")
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    assert torch.equal(compiled(x), expected)


def test_kernel_declines_what_it_does_not_cover(kernel: None, monkeypatch) -> None:
    c, u = torch.ones(2, 3).cumsum(1), torch.full((2, 4), 0.5)
    assert sap_kernel.keep_mask(c.half(), u.half()) is None
    assert sap_kernel.keep_mask(c, u.double()) is None
    assert sap_kernel.keep_mask(c[:0], u[:0]) is None
    bits = torch.zeros(2, 3, dtype=torch.int16)
    assert sap_kernel.poisson_tail(c.half(), c.half(), bits, 32768.0) is None
    assert sap_kernel.poisson_tail(c, c, bits.int(), 32768.0) is None
    assert sap_kernel.poisson_tail(c, c, bits, 32768.0) is not None
    monkeypatch.setenv("BASTION_SAP_KERNEL", "off")
    assert sap_kernel.keep_mask(c, u) is None
    assert sap_kernel.poisson_tail(c, c, bits, 32768.0) is None


def test_missing_compiler_warns_once_and_searchsorted_gives_the_same_mask(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(sap_kernel, "_state", {})
    monkeypatch.setenv("CC", "no-such-compiler-bastion")
    monkeypatch.setenv("BASTION_KERNELS", str(tmp_path))
    a = torch.rand(6, 30)
    with caplog.at_level(logging.WARNING, logger=sap_kernel.__name__):
        torch.manual_seed(0)
        first = sap_keep_mask(a, 30)
        sap_keep_mask(a, 30)
    warnings = [r for r in caplog.records if "SAP's CPU kernels are unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no-such-compiler-bastion" in warnings[0].getMessage()
    c = a.cumsum(1)
    torch.manual_seed(0)
    s = torch.rand(6, 31).clamp_min_(torch.finfo(a.dtype).tiny).log_().cumsum_(1)
    assert torch.equal(first, _reference(c, s[:, :30].mul_(c[:, -1:] / s[:, 30:]).contiguous()))


def test_kernel_is_built_atomically_under_its_hash_with_a_compiler_carrying_arguments(tmp_path, monkeypatch) -> None:
    if sap_kernel.shutil.which("cc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(sap_kernel, "_state", {})
    monkeypatch.setenv("BASTION_KERNELS", str(tmp_path / "k"))
    monkeypatch.setenv("CC", "cc -Wall")
    assert sap_kernel._load() is not None  # noqa: SLF001
    built = list((tmp_path / "k").iterdir())
    assert len(built) == 1 and built[0].name.startswith("sap_kernels-") and built[0].suffix == ".so"
    assert (tmp_path / "k").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("where", ["folder", "library"])
def test_a_library_others_can_write_is_not_loaded(tmp_path, monkeypatch, caplog, where: str) -> None:
    if sap_kernel.shutil.which("cc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("BASTION_KERNELS", str(tmp_path / "k"))
    monkeypatch.setattr(sap_kernel, "_state", {})
    assert sap_kernel._load() is not None  # noqa: SLF001
    (built,) = (tmp_path / "k").iterdir()
    (tmp_path / "k" if where == "folder" else built).chmod(0o777)
    monkeypatch.setattr(sap_kernel, "_state", {})
    with caplog.at_level(logging.WARNING, logger=sap_kernel.__name__):
        assert sap_kernel._load() is None  # noqa: SLF001
    assert "writable by group or others" in caplog.text


def test_no_home_directory_falls_back_with_a_warning(monkeypatch, caplog) -> None:
    def no_home() -> None:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(sap_kernel, "_state", {})
    monkeypatch.delenv("BASTION_KERNELS", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(sap_kernel.Path, "home", staticmethod(no_home))
    a = torch.rand(5, 20)
    with caplog.at_level(logging.WARNING, logger=sap_kernel.__name__):
        torch.manual_seed(0)
        got = sap_keep_mask(a, 20)
    assert "home directory" in caplog.text
    c = a.cumsum(1)
    torch.manual_seed(0)
    s = torch.rand(5, 21).clamp_min_(torch.finfo(a.dtype).tiny).log_().cumsum_(1)
    assert torch.equal(got, _reference(c, s[:, :20].mul_(c[:, -1:] / s[:, 20:]).contiguous()))


def test_a_forked_child_gets_its_own_threads(kernel: None) -> None:
    """A pool inherited through fork has no threads; the child must not wait on it forever."""
    import multiprocessing as mp

    c, u = _rows(64, 200, 200, torch.float32, torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            assert torch.equal(sap_kernel.keep_mask(c, u), _reference(c, u))  # the parent's pool exists now
            ctx = mp.get_context("fork")
            with ctx.Pool(1) as pool:
                got = pool.apply_async(_child_mask, (c, u)).get(timeout=60)
        finally:
            torch.set_num_threads(before)
    assert torch.equal(got, _reference(c, u))


def _child_mask(c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    torch.set_num_threads(2)
    out = sap_kernel.keep_mask(c, u)
    assert out is not None
    return out
