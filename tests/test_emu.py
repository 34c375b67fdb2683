"""EMU (unidd_fast.emu): running means of finished class-batches, graph-safe buffers,
state dicts and the safetensors file, against the plain mean of the batches."""
import pytest
import torch
from safetensors.torch import save_file

from unidd_fast.emu import EMU, load_state, save_state
from unidd_fast.errors import StatsFileError, StatsMismatchError

SHAPES = {5: ((2, 5, 5), (2, 5, 3)), 7: ((1, 7, 7), (1, 7, 3))}


def batches(gen, n):
    return [{d: (torch.randn(p, generator=gen, dtype=torch.float64), torch.randn(s, generator=gen, dtype=torch.float64))
             for d, (p, s) in SHAPES.items()} for _ in range(n)]


def test_fold_is_the_mean_of_the_batches_and_blend_weights_the_current_one(gen):
    data = batches(gen, 4)
    emu = EMU(SHAPES)
    current = batches(gen, 1)[0]
    assert emu.blend(5, *current[5]) == current[5]  # b = 1: the batch on its own
    emu.fold_all(data[:3])
    emu.fold(data[3])
    assert (emu.b, emu.batches_done) == (5, 4)
    for d in SHAPES:
        for i in range(2):
            mean = torch.stack([batch[d][i] for batch in data]).mean(0)
            torch.testing.assert_close(emu.means[d][i], mean, rtol=1e-14, atol=1e-15)
            blended = emu.blend(d, *current[d])[i]
            torch.testing.assert_close(blended, (4 * mean + current[d][i]) / 5, rtol=1e-13, atol=1e-15)


def test_graph_safe_gives_the_same_numbers_in_place(gen):
    data, current = batches(gen, 3), batches(gen, 1)[0]
    eager, safe = EMU(SHAPES), EMU(SHAPES)
    safe.make_graph_safe("cpu")
    safe.blend(5, *current[5])  # allocates the buffers a captured graph would read
    safe.blend(7, *current[7])
    pointers = {d: [t.data_ptr() for t in pair] for d, pair in safe.means.items()}
    for batch in data:
        for d in SHAPES:
            for a, b in zip(eager.blend(d, *current[d]), safe.blend(d, *current[d])):
                torch.testing.assert_close(b, a, rtol=1e-15, atol=0)
        eager.fold(batch)
        safe.fold(batch)
        assert float(safe._b_dev) == safe.b == eager.b
    assert {d: [t.data_ptr() for t in pair] for d, pair in safe.means.items()} == pointers
    safe.load_state_dict({k: v.clone() for k, v in EMU(SHAPES).state_dict().items()})  # back to b = 1
    assert safe.b == 1 and all(bool((t == 0).all()) for pair in safe.means.values() for t in pair)
    assert {d: [t.data_ptr() for t in pair] for d, pair in safe.means.items()} == pointers


def test_file_round_trip_and_hostile_files(gen, tmp_path):
    emu = EMU(SHAPES)
    emu.fold_all(batches(gen, 2))
    emu.save(tmp_path / "emu.safetensors", {"ipc": [0, 4]})
    other = EMU(SHAPES)
    assert other.load(tmp_path / "emu.safetensors") == {"ipc": [0, 4]}
    assert other.b == 3
    for key, value in emu.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)
    with pytest.raises(StatsFileError, match="does not exist"):
        other.load(tmp_path / "missing.safetensors")
    (tmp_path / "torn.safetensors").write_bytes((tmp_path / "emu.safetensors").read_bytes()[:50])
    with pytest.raises(StatsFileError, match="not a readable"):
        other.load(tmp_path / "torn.safetensors")
    save_file({"b": torch.tensor(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(StatsFileError, match="not an EMU state file"):
        load_state(tmp_path / "plain.safetensors")
    state = emu.state_dict()
    save_state(tmp_path / "wide.safetensors", dict(state, **{"9/psi": torch.zeros(1, 9, 9)}))
    with pytest.raises(StatsMismatchError, match="9/psi"):
        other.load(tmp_path / "wide.safetensors")
    save_state(tmp_path / "shape.safetensors", dict(state, **{"5/sig": torch.zeros(2, 5, 4)}))
    with pytest.raises(StatsMismatchError, match="shape"):
        other.load(tmp_path / "shape.safetensors")
    save_state(tmp_path / "empty.safetensors", {"b": torch.tensor(3)})
    with pytest.raises(StatsMismatchError, match="no running means"):
        other.load(tmp_path / "empty.safetensors")
    assert other.b == 3  # a refused state changes nothing
