"""Faults a user can cause with the whole-model transformations (issue 17): tied weights and modules used
in several places (tensorize, to_dense, adapt), the classifier kept dense by default, summary's sizes for
layers larger than dense, TorchScript models and models already tensorized. Each result is checked against
an independent reference (plain modules, parameter counts summed by hand), never against tnlayers itself."""
import re
import warnings

import pytest
import torch
from torch import nn

import tnlayers
from tnlayers import TTLinear, tensorize, to_dense
from tnlayers.adapters import LinearAdapter, adapt, merge, trainable_parameters, unadapt


def _record(fn, *args, **kwargs):
    """(result, [warning messages]) of one call."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    return result, [str(w.message) for w in caught]


def _count(model):  # each parameter once, as model.parameters() yields them
    return sum(p.numel() for p in model.parameters())


class Shared(nn.Module):
    """One Linear registered twice (``a`` and ``b``), applied twice, then a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = self.a
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))))


class Tied(nn.Module):
    """Two distinct Linears sharing one weight Parameter (each has its own bias)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.fc = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))))


class TinyLM(nn.Module):
    """A language model's weight tying: the output head's weight is the embedding's."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.body, self.lm_head = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens):
        return self.lm_head(torch.relu(self.body(self.embed(tokens))))


# -- item 5: tied weights -----------------------------------------------------------------------------

def test_a_module_in_two_places_is_tensorized_once_and_stays_shared():
    model, x = Shared(), torch.randn(5, 8)
    tensorize(model, rank=2, filter=["a", "b"])  # both of its names may be used
    assert isinstance(model.a, TTLinear) and model.a is model.b and isinstance(model.fc, nn.Linear)
    layer = model.a
    assert _count(model) == sum(p.numel() for p in layer.parameters()) + 8 * 3 + 3
    reference = lambda: model.fc(torch.relu(layer(torch.relu(layer(x)))))  # noqa: E731
    torch.testing.assert_close(model(x), reference())
    before = [p.detach().clone() for p in layer.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().sum().backward()
    opt.step()
    assert model.a is model.b and any(not torch.equal(p, q) for p, q in zip(layer.parameters(), before))
    torch.testing.assert_close(model(x), reference())  # both places moved by the one step


def test_a_module_in_two_places_named_differently_by_the_arguments_is_refused():
    model = Shared()
    with pytest.raises(ValueError, match=r"registered as \['a', 'b'\].*same setting"):
        tensorize(model, rank=2, filter=["b"])
    assert type(model.a) is nn.Linear and model.a is model.b


def test_distinct_linears_sharing_a_weight_stay_dense_with_one_warning():
    model, x = Tied(), torch.randn(5, 8)
    expected = model(x).detach()
    _, messages = _record(tensorize, model, rank=2, filter=["a", "b"])
    assert type(model.a) is nn.Linear and type(model.b) is nn.Linear and model.a.weight is model.b.weight
    (message,) = [m for m in messages if "tied" in m]
    assert re.search(r"\ba: tied weights", message) and re.search(r"\bb: tied weights", message)
    assert "'b.weight'" in message and "'a.weight'" in message and "nn.Parameter(" in message
    torch.testing.assert_close(model(x), expected)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().sum().backward()
    opt.step()
    assert model.a.weight is model.b.weight  # still one weight after the step


def test_an_output_head_tied_to_the_embedding_stays_dense_and_tied():
    model, tokens = TinyLM(), torch.randint(0, 10, (4, 6))
    _, messages = _record(tensorize, model, rank=2, filter=["body", "lm_head"])
    assert isinstance(model.body, TTLinear) and type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.embed.weight
    assert any("lm_head: tied weights" in m and "'embed.weight'" in m for m in messages)
    with torch.no_grad():
        model.embed.weight.mul_(2)  # one write reaches both uses
    reference = torch.relu(model.body(model.embed.weight[tokens])) @ model.embed.weight.t()
    torch.testing.assert_close(model(tokens), reference)


def test_to_dense_turns_a_layer_in_two_places_into_one_dense_module():
    model, x = Shared(), torch.randn(5, 8)
    tensorize(model, rank=2, filter=["a", "b"])
    expected = model(x).detach()
    to_dense(model)
    assert type(model.a) is nn.Linear and model.a is model.b
    torch.testing.assert_close(model(x), expected)


def test_to_dense_leaves_layers_sharing_cores_tensorized_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(TTLinear(8, 8, rank=2), nn.ReLU(), TTLinear(8, 8, rank=2))
    model[2].cores = model[0].cores  # one set of cores in two layers
    x = torch.randn(3, 8)
    expected = model(x).detach()
    _, messages = _record(to_dense, model)
    assert isinstance(model[0], TTLinear) and isinstance(model[2], TTLinear) and model[0].cores is model[2].cores
    assert any("to_dense left 2 layer(s) tensorized" in m and "'2.cores.0'" in m for m in messages)
    torch.testing.assert_close(model(x), expected)


def test_adapt_wraps_a_module_in_two_places_once():
    model, x = Shared(), torch.randn(5, 8)
    adapt(model, format="lora", rank=2, target_modules=["a", "b"], init="random")
    assert isinstance(model.a, LinearAdapter) and model.a is model.b
    adapter = model.a
    assert trainable_parameters(model).trainable == sum(p.numel() for p in adapter.cores)  # one adapter's cores
    with torch.no_grad():
        w = adapter.base.weight + adapter.delta_weight()
        inner = lambda z: torch.relu(z @ w.t() + adapter.base.bias)  # noqa: E731
        torch.testing.assert_close(model(x), model.fc(inner(inner(x))))


def test_adapt_refuses_a_selection_of_only_some_places_of_a_shared_module():
    model = Shared()
    with pytest.raises(ValueError, match=r"matches 'a' but not \['b'\], which is the same module object"):
        adapt(model, format="lora", rank=2, target_modules=["a"])
    assert type(model.a) is nn.Linear and model.a.weight.requires_grad


def test_adapt_warns_about_a_tied_head_and_merge_refuses_it():
    model, tokens = TinyLM(), torch.randint(0, 10, (4, 6))
    _, messages = _record(adapt, model, format="lora", rank=2, target_modules=["lm_head"], init="random")
    assert any("tied weights" in m and "'embed.weight'" in m for m in messages)
    embed, out = model.embed.weight.detach().clone(), model(tokens).detach()
    with pytest.raises(ValueError, match="tied weights.*would change the other module"):
        merge(model)
    with pytest.raises(ValueError, match="tied weights"):
        unadapt(model, merge=True)
    assert torch.equal(model.embed.weight, embed) and not model.lm_head.merged
    torch.testing.assert_close(model(tokens), out)


# -- item 8: the classifier kept dense ----------------------------------------------------------------

class HeadFirst(nn.Module):
    """Registers the head before the body; applies the body first."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(8, 3)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8))

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def _dense_names(model):
    return sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)


def test_example_inputs_keep_the_last_applied_linear_dense():
    model = HeadFirst().train()
    bn = model.body[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    tensorize(model, rank=2, example_inputs=torch.randn(6, 4))
    assert _dense_names(model) == ["head"]
    assert isinstance(model.body[0], TTLinear) and isinstance(model.body[3], TTLinear)
    # the dry forward changed nothing: no BatchNorm statistics, train mode kept
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2] and model.training and bn.training


def test_example_inputs_as_keywords():
    model = TinyLM()
    tensorize(model, rank=2, example_inputs={"tokens": torch.randint(0, 10, (2, 3))})
    assert isinstance(model.body, TTLinear) and type(model.lm_head) is nn.Linear


def test_without_example_inputs_a_classifier_not_named_so_is_kept_dense_with_a_warning():
    model = HeadFirst()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tensorize(model, rank=2)
    assert _dense_names(model) == ["body.3"]  # the last registered Linear, as documented
    (warning,) = [w for w in caught if "classifier" in str(w.message)]
    message = str(warning.message)
    assert "'body.3'" in message and "['head']" in message and "example_inputs=" in message
    assert warning.filename == __file__  # points at the user's call


def test_a_conventionally_named_classifier_is_kept_dense_silently():
    model = tnlayers.models.resnet20()
    _, messages = _record(tensorize, model, rank=2, format="tt")
    assert _dense_names(model) == ["fc"] and not [m for m in messages if "classifier" in m]


def test_the_last_linear_of_nested_sequentials_is_kept_dense_silently():
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2)))
    _, messages = _record(tensorize, model, rank=2)
    assert _dense_names(model) == ["1.2"] and not [m for m in messages if "classifier" in m]
    wrapped = nn.Sequential(HeadFirst())  # a custom module inside: its forward order is unknown
    _, messages = _record(tensorize, wrapped, rank=2)
    assert any("'0.body.3'" in m and "classifier" in m for m in messages)


def test_example_inputs_with_an_explicit_selection_is_refused():
    with pytest.raises(ValueError, match="example_inputs= only finds the classifier"):
        tensorize(HeadFirst(), rank=2, filter=["head"], example_inputs=torch.randn(2, 4))
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        tensorize(HeadFirst(), rank=2, example_inputs="x")


# -- item 9: layers larger than dense, in summary -----------------------------------------------------

def test_summary_says_larger_per_layer_and_smaller_in_total_on_tr_resnet32_rank15(capsys):
    dense = tnlayers.models.resnet32()
    dense_counts = {n: sum(p.numel() for p in m.parameters()) for n, m in dense.named_modules()
                    if isinstance(m, nn.Conv2d)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tensorize(tnlayers.models.resnet32(), format="tr", rank=15)
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_modules()
              if isinstance(m, tnlayers.TRConv2d)}
    result = tnlayers.summary(model)
    text = capsys.readouterr().out
    larger = sorted(n for n in counts if counts[n] > dense_counts[n])
    assert len(larger) == 12 and sorted(result.larger) == larger
    for name in counts:  # each row: the direction in words, the factor from independent counts
        (line,) = [ln for ln in text.splitlines() if ln.split()[:1] == [name]]
        big, small = max(counts[name], dense_counts[name]), min(counts[name], dense_counts[name])
        word = "larger" if counts[name] > dense_counts[name] else "smaller"
        assert f"{big / small:.2f}x {word}" in line, line
    assert "12 of 31 tensorized layers are larger than dense" in text
    total, dense_total = _count(model), _count(dense)
    assert f"total: {total:,} parameters (dense: {dense_total:,}, {dense_total / total:.2f}x smaller)" in text
    assert "left dense: 1 Conv/Linear layer(s): fc" in text


def test_summary_footer_says_larger_for_a_model_that_got_larger():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tensorize(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)), format="tr", rank=8)
    result = tnlayers.summary(model, print_table=False)
    total, dense_total = _count(model), 16 * 16 + 16 + 16 * 2 + 2
    assert total > dense_total
    assert result.table.splitlines()[-1] == (f"total: {total:,} parameters (dense: {dense_total:,}, "
                                             f"{total / dense_total:.2f}x larger)")
    assert "smaller" not in result.table


def test_print_of_summary_shows_the_table_once(capsys):
    """`print(tnlayers.summary(m))`: summary prints the table, print adds one line, not the table again;
    `tnlayers.summary(m)` as a statement prints the table; the REPL echo (repr) is that one line too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tensorize(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)), format="tr", rank=8)
    result = tnlayers.summary(model)
    assert capsys.readouterr().out == result.table + "\n"
    print(tnlayers.summary(model))
    out = capsys.readouterr().out
    assert out == result.table + "\n" + repr(result) + "\n"
    assert str(result) == repr(result) and "\n" not in repr(result)
    assert repr(result) == ("<tnlayers Summary: 1 tensorized layer(s) (1 larger than dense), 1 Conv/Linear left "
                            f"dense; {result.params:,} parameters (dense: {result.dense_params:,}, "
                            f"{result.params / result.dense_params:.2f}x larger); .table has the table>")
    assert tnlayers.summary(model, print_table=False).table == result.table
    assert capsys.readouterr().out == ""


# -- TorchScript and already tensorized models ----------------------------------------------------------

@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_tensorize_refuses_a_script_module():
    scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    for fn in (lambda m: tensorize(m, rank=2), to_dense, lambda m: adapt(m, target_modules=["0"])):
        with pytest.raises(TypeError, match="eager nn.Module.*ScriptModule's submodules can't be swapped|TorchScript"):
            fn(scripted)


def test_tensorize_in_another_format_of_a_tensorized_model_is_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tensorize(tnlayers.models.resnet20(), rank=2, format="tt")
    with pytest.raises(ValueError, match=r"already tensorized in another format \('conv1' is format 'tt', asked "
                                         r"'cp'.*to_dense\(model\) first"):
        tensorize(model, rank=2, format="cp")
    assert isinstance(model.conv1, tnlayers.TTConv2d)


def test_tensorize_again_in_the_same_format_says_so():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tensorize(tnlayers.models.resnet20(), rank=2, format="tt")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, messages = _record(tensorize, model, rank=3, format="tt")
    assert any("already tensorized in the asked format" in m and "ranks neither" in m for m in messages)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_tensorize_again_finishes_a_partly_tensorized_model():
    model = tensorize(tnlayers.models.resnet20(), rank=2, format="tt", filter=["layer1.*"])
    _, messages = _record(tensorize, model, rank=2, format="tt")
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, tnlayers.TensorizedConv2d))]
    assert convs and all(isinstance(m, tnlayers.TTConv2d) for m in convs)
    assert not [m for m in messages if "already tensorized" in m or "nothing" in m]
