"""ONNX export (scripts/export_onnx.py) run in onnxruntime, and the dense path it exports against the unpadded one."""

import importlib.util
import subprocess
import sys

import pytest
import torch

from conftest import REPO, package_module, tiny_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

spec = importlib.util.spec_from_file_location("export_onnx", REPO / "scripts" / "export_onnx.py")
export_onnx = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_onnx)

AUTO_CLASS = {task: auto for task, (auto, _) in export_onnx.TASKS.items()}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny saved model per task, loaded back the way the script loads it."""

    def make(task):
        folder = tmp_path_factory.mktemp(task)
        tiny_model(AUTO_CLASS[task], vocab_size=200, num_labels=3).save_pretrained(folder)
        return folder

    return make


@pytest.mark.parametrize("task", sorted(export_onnx.TASKS))
def test_export_runs_in_onnxruntime_and_matches_pytorch(model_folder, tmp_path, task):
    import onnx

    model = export_onnx.load_model(model_folder(task), task)
    path = export_onnx.export(model, tmp_path / "model.onnx", task)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == export_onnx.INPUTS
    for i in graph.input:  # batch and sequence are symbolic, not the export example's 2 x 8
        assert [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert [o.name for o in graph.output] == export_onnx.TASKS[task][1]
    # Other batch sizes and lengths than the example (3 x 13 with a length-1 row, 5 x 16 left-padded, 1 x 21).
    assert export_onnx.check(model, path, task, atol=1e-4) <= 1e-4


def test_export_script_command_line(model_folder, tmp_path):
    output = tmp_path / "mlm.onnx"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "export_onnx.py"), "--model", str(model_folder("fill-mask")),
         "--task", "fill-mask", "--output", str(output)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert output.exists() and "onnxruntime matches PyTorch" in result.stdout


# ------------------------------------------------------------------------------------------------ dense path parity


def _batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (4, 11), generator=g)
    right = torch.tensor([[1] * 11, [1] * 4 + [0] * 7, [1] * 1 + [0] * 10, [1] * 9 + [0] * 2])
    left = right.flip(-1)
    holes = torch.randint(0, 2, (4, 11), generator=g)
    holes[:, 0] = 1
    empty_row = right.clone()
    empty_row[2] = 0
    token_type = (torch.arange(11) >= 5).long().expand(4, -1).contiguous()
    yield "right padding", dict(input_ids=ids, attention_mask=right, token_type_ids=token_type * right)
    yield "left padding", dict(input_ids=ids, attention_mask=left)
    yield "holes in the mask", dict(input_ids=ids, attention_mask=holes)
    yield "a row without tokens", dict(input_ids=ids, attention_mask=empty_row)
    yield "no mask", dict(input_ids=ids)
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1]] * 4)
    yield "packed by position_ids", dict(input_ids=ids, attention_mask=right, position_ids=packed)
    yield "packed by cu_seqlens", dict(input_ids=ids[:1], cu_seqlens=torch.tensor([0, 3, 3, 8, 11]))


@pytest.mark.parametrize("auto_class", ["AutoModel", "AutoModelForMaskedLM", "AutoModelForTokenClassification",
                                        "AutoModelForSequenceClassification", "AutoModelForQuestionAnswering"])
def test_dense_path_matches_unpadded_path(monkeypatch, auto_class):
    """The path taken while exporting gives the unpadded path's outputs, zeros at padding included."""
    model = tiny_model(auto_class, num_labels=3)
    module = package_module(model)
    for name, inputs in _batches():
        with torch.no_grad():
            unpadded = model(**inputs, output_hidden_states=True)
            with monkeypatch.context() as m:
                m.setattr(module, "exporting", lambda: True)
                dense = model(**inputs, output_hidden_states=True)
        for key in unpadded.keys():
            torch.testing.assert_close(dense[key], unpadded[key], rtol=1e-5, atol=1e-5, msg=f"{name}: {key}")


def test_dense_path_gradients_match_unpadded_path(monkeypatch):
    """Sparse MLM loss and gradients are the same on both paths (labels at padding are not tokens)."""
    model = tiny_model()
    module = package_module(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 99, (3, 9), generator=g)
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [0] * 2 + [1] * 7])
    labels = torch.where(torch.rand(3, 9, generator=g) < 0.4, ids, -100)
    labels[1, 7] = 5  # a label on padding is ignored on both paths

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    monkeypatch.setattr(module, "exporting", lambda: True)
    dense_loss, dense_grads = loss_and_grads()
    torch.testing.assert_close(dense_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == dense_grads.keys()
    for k in grads:
        torch.testing.assert_close(dense_grads[k], grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_output_attentions_use_the_dense_path_and_stay_on_the_gradient_path():
    model = tiny_model("AutoModel")
    ids = torch.randint(1, 99, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    attentions, hidden = out.attentions[0], out.hidden_states[0]
    attentions.retain_grad()
    hidden.retain_grad()
    out.last_hidden_state.sum().backward()
    assert attentions.grad is not None and hidden.grad is not None
    assert (attentions[1, :, 3:] == 0).all() and (attentions[1, :, :, 3:] == 0).all()
    torch.testing.assert_close(attentions[1, :, :3].sum(-1), torch.ones(4, 3))
