import torch

from compressor.decompose import Factorization
from compressor.factor_store import FactorStore


def _factor(seed: int, out: int = 6, inner: int = 4, k: int = 3) -> Factorization:
    generator = torch.Generator().manual_seed(seed)
    return Factorization(torch.randn(out, k, generator=generator), torch.rand(k, generator=generator),
                         torch.randn(k, inner, generator=generator), "whiten")


def test_the_store_gives_back_what_was_written_one_layer_in_memory(tmp_path):
    layers = [{f"l{index}.q": _factor(2 * index), f"l{index}.k": _factor(2 * index + 1, out=2)} for index in range(3)]
    store = FactorStore(tmp_path / "bases")
    for index, factors in enumerate(layers):
        store.write_layer(index, factors)
    assert list(store) == ["l0.q", "l0.k", "l1.q", "l1.k", "l2.q", "l2.k"] and len(store) == 6
    for factors in layers:
        for name, factor in factors.items():
            got = store[name]
            assert got.method == "whiten" and all(torch.equal(getattr(got, part), getattr(factor, part))
                                                  for part in ("u", "sigma", "w"))
            assert set(store._open_tensors) == {f"{key}.{part}" for key in factors for part in ("u", "sigma", "w")}
    # A reordered factorization replaces the stored one, in memory; deleting forgets either.
    store["l1.q"] = layers[0]["l0.q"]
    assert torch.equal(store["l1.q"].u, layers[0]["l0.q"].u) and len(store) == 6
    del store["l1.q"], store["l2.k"]
    assert "l1.q" not in store and "l2.k" not in store and len(store) == 4
    assert dict(store).keys() == {"l0.q", "l0.k", "l1.k", "l2.q"}


def test_a_dropped_layer_leaves_the_disk_and_the_store(tmp_path):
    store = FactorStore(tmp_path / "bases")
    for index in range(2):  # a file per linear (as streaming_global writes them)
        for name, seed in (("q", index), ("k", index + 5)):
            store.write_layer(index, {f"l{index}.{name}": _factor(seed)}, suffix=f"-{name}")
    store["l0.q"]  # a file of layer 0 read, held
    store.drop_layer(0)
    assert sorted(path.name for path in (tmp_path / "bases").iterdir()) == ["layer-00001-k.safetensors",
                                                                           "layer-00001-q.safetensors"]
    assert list(store) == ["l1.q", "l1.k"] and store._open_tensors == {}
    assert torch.equal(store["l1.k"].w, _factor(6).w) and torch.equal(store["l1.q"].u, _factor(1).u)
