"""save_adapters / load_adapters: the files hold the cores alone plus a JSON config; a fresh base model with
the loaded adapters computes what the saved model did, bit for bit (plain torch models, a tiny random-config
GPT-2); every refusal leaves the model as it was."""
import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from test_adapters import dense_net, train_a_little
from tnlayers.adapters import (LinearAdapter, adapt, load_adapters, merge, named_adapters, save_adapters,
                               trainable_parameters)

safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ranks above a tiny layer's size warn (excess bonds)
        yield


class Shared(nn.Module):
    """dense_net's layers plus one Linear registered twice (one layer, two places)."""

    def __init__(self):
        super().__init__()
        self.net = dense_net()
        self.proj = nn.Linear(4, 4)
        self.again = self.proj

    def forward(self, x):
        return self.again(torch.tanh(self.proj(self.net(x))))


def adapted(base):
    """Two adapt calls with different options, per-layer TT shapes, a shared layer; trained a little."""
    adapt(base, "tt", rank=2, alpha=4, target_modules=["net.3"], shapes={"net.3": {"out_shape": (3, 4)}},
          dropout=0.1)
    adapt(base, "cp", rank=3, alpha=6, target_modules=["net.0", "proj", "again"], strategy="factorized")
    train_a_little(base, torch.randn(4, 3, 5, 5))
    return base.eval()


def state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_round_trip_into_a_fresh_base_model_is_bitwise(tmp_path):
    torch.manual_seed(0)
    base = Shared()
    fresh = copy.deepcopy(base)
    model = adapted(base)
    x = torch.randn(6, 3, 5, 5)
    folder = save_adapters(model, tmp_path / "adapters")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with safetensors_torch.safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    expected = {f"{name}.cores.{k}" for name, a in named_adapters(model) for k in range(len(a.cores))}
    assert keys == expected  # the cores alone: no base weight, no bias
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["layers"]["proj"]["places"] == ["proj", "again"]
    assert config["layers"]["net.3"]["out_shape"] == [3, 4] and config["layers"]["net.3"]["dropout"] == 0.1

    loaded = load_adapters(fresh, folder).eval()
    assert loaded is fresh and loaded.again is loaded.proj  # one adapter in both places again
    assert torch.equal(loaded(x), model(x))
    for (name, a), (_, b) in zip(named_adapters(loaded), named_adapters(model)):
        assert (a.format, a.rank, a.alpha, a.strategy, a.out_shape) == (b.format, b.rank, b.alpha, b.strategy,
                                                                        b.out_shape), name
        assert type(a.dropout) is type(b.dropout)
    assert trainable_parameters(loaded) == trainable_parameters(model)
    assert all(p.requires_grad == (".cores." in n) for n, p in loaded.named_parameters())


def test_a_merged_model_saves_its_cores_and_loads_unmerged(tmp_path):
    torch.manual_seed(1)
    base = dense_net()
    fresh = copy.deepcopy(base)
    model = adapt(base, "lora", rank=2, target_modules=["3", "5"], init="random")
    x = torch.randn(3, 3, 5, 5)
    y = model(x)
    merge(model)
    save_adapters(model, tmp_path)
    loaded = load_adapters(fresh, tmp_path)
    assert not any(a.merged for _, a in named_adapters(loaded))
    assert torch.equal(loaded(x), y)


def test_gpt2_adapters_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")

    def gpt2():
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                                         bos_token_id=0, eos_token_id=1)
        return transformers.GPT2Model(config).eval()

    model, ids = gpt2(), torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    adapt(model, "tucker", rank=4, target_modules=["c_attn", "c_fc"], init="random")
    save_adapters(model, tmp_path)
    loaded = load_adapters(gpt2(), tmp_path)
    assert [n for n, _ in named_adapters(loaded)] == ["h.0.attn.c_attn", "h.0.mlp.c_fc", "h.1.attn.c_attn",
                                                      "h.1.mlp.c_fc"]
    assert torch.equal(loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


# -- refusals -----------------------------------------------------------------------------------------------
def saved(tmp_path):
    torch.manual_seed(2)
    model = adapt(dense_net(), "tt", rank=2, target_modules=["3", "5"], init="random")
    save_adapters(model, tmp_path)
    return tmp_path


def rewrite_config(folder, change):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def rewrite_tensors(folder, change):
    path = str(folder / "adapter_model.safetensors")
    tensors = safetensors_torch.load_file(path)
    change(tensors)
    safetensors_torch.save_file(tensors, path)


class Renamed(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = dense_net()


def wider():
    net = dense_net()
    net[5] = nn.Linear(12, 6)
    return net


LOAD_ERRORS = [
    ("missing-files", lambda d: (d / "adapter_config.json").unlink(), dense_net, FileNotFoundError,
     r"lacks \['adapter_config.json'\]"),
    ("bad-json", lambda d: (d / "adapter_config.json").write_text("{"), dense_net, ValueError, "is not valid JSON"),
    ("bad-version", lambda d: rewrite_config(d, lambda c: c.update(tnlayers_adapters=7)), dense_net, ValueError,
     "is not a tnlayers adapter config of version 1"),
    ("missing-field", lambda d: rewrite_config(d, lambda c: c["layers"]["5"].pop("rank")), dense_net, ValueError,
     r"layer '5' of .* lacks \['rank'\]"),
    ("missing-key", lambda d: rewrite_tensors(d, lambda t: t.pop("5.cores.0")), dense_net, ValueError,
     r"missing keys \['5.cores.0'\], unexpected keys \[\]"),
    ("unexpected-key", lambda d: rewrite_tensors(d, lambda t: t.update({"5.base.weight": torch.zeros(4, 12)})),
     dense_net, ValueError, r"unexpected keys \['5.base.weight'\]"),
    ("shape", lambda d: rewrite_tensors(d, lambda t: t.update({"3.cores.0": torch.zeros(9, 9)})), dense_net,
     ValueError, r"shape mismatch in adapter_model.safetensors: 3.cores.0: \(9, 9\) in the file"),
    ("no-module", lambda d: None, Renamed, ValueError,
     r"the model has no module '3'.*names that differ by a prefix: \['body.3'\]"),
    ("weight-shape", lambda d: None, wider, ValueError, r"'5' is a Linear with weight \[6, 12\]; the adapter was "
     r"saved on a Linear with weight \[4, 12\]"),
    ("already-adapted", lambda d: None, lambda: adapt(dense_net(), "lora", target_modules=["5"]), ValueError,
     r"load_adapters: '5' is already adapted \(LinearAdapter\)"),
    ("core-layout", lambda d: rewrite_config(d, lambda c: c["layers"]["3"].update(out_shape=[2, 6])), dense_net,
     ValueError, r"load_adapters: 3.cores.\d is \(.*\) here, \(.*\) in the file"),  # after adapt: undone
    ("bad-option", lambda d: rewrite_config(d, lambda c: c["layers"]["5"].update(rank=0)), dense_net, ValueError,
     "load_adapters: rank"),
]


@pytest.mark.parametrize("spoil,make,error,match", [e[1:] for e in LOAD_ERRORS], ids=[e[0] for e in LOAD_ERRORS])
def test_load_refuses_and_leaves_the_model_as_it_was(tmp_path, spoil, make, error, match):
    folder = saved(tmp_path)
    spoil(folder)
    model = make()
    before, flags = state(model), {n: p.requires_grad for n, p in model.named_parameters()}
    kinds = [type(m) for m in model.modules()]
    with pytest.raises(error, match=match):
        load_adapters(model, folder)
    assert [type(m) for m in model.modules()] == kinds
    assert all(torch.equal(p, before[n]) and p.requires_grad == flags[n] for n, p in model.named_parameters())


def test_save_refuses_what_it_cannot_save(tmp_path):
    with pytest.raises(ValueError, match="save_adapters: the model has no adapters"):
        save_adapters(dense_net(), tmp_path)
    with pytest.raises(ValueError, match="save_adapters: give the model that holds the adapters"):
        save_adapters(LinearAdapter(nn.Linear(4, 4), "lora", rank=2), tmp_path)
    with pytest.raises(TypeError, match="directory must be a str or os.PathLike, got int"):
        save_adapters(adapt(dense_net(), "lora", rank=2, target_modules=["5"]), 3)
    with pytest.raises(TypeError, match="load_adapters expects an nn.Module, got str"):
        load_adapters("model", tmp_path)


def test_without_safetensors_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors now raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        save_adapters(adapt(dense_net(), "lora", rank=2, target_modules=["5"]), tmp_path)


def test_importing_tnlayers_imports_neither_safetensors_nor_peft():
    code = ("import sys, tnlayers; assert 'safetensors' not in sys.modules, 'safetensors'; "
            "assert 'peft' not in sys.modules, 'peft'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
