"""A tiny late-interaction (ColBERT-shaped) teacher as the catalogued one arrives: an int8 ONNX
BERT encoder whose output 0 is the last hidden states [batch, tokens, dim], a BERT tokenizer
whose vocabulary has the `[unused0]` / `[unused1]` markers and `[MASK]`, and the config.json
that provisioning writes beside it; registered with scoring "late_interaction"."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertTokenizerFast

from ml_core.registry import ModelSpec
from tests.tiny_models import _bert_config, _export_onnx, _ExportableBert, _save_spec, tiny_vocab

MARKERS = ["[unused0]", "[unused1]"]


def build_tiny_colbert(folder: Path, max_passage_length: int = 48) -> tuple[ModelSpec, Path]:
    """(the int8 ONNX teacher's spec, the float ONNX file it was quantised from)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    vocab = [vocab[0], *MARKERS, *vocab[1:]]  # as BERT's: [PAD] [unused0] [unused1] ...
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True,
                                  model_max_length=512)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(6)
    model = _ExportableBert(_bert_config(len(vocab)), add_pooling_layer=False).eval()
    with torch.no_grad():  # no two initializers equal (the exporter shares equal constants)
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.config.save_pretrained(folder)
    float_onnx = folder.parent / f"{folder.name}-float.onnx"
    _export_onnx(model, float_onnx, "last_hidden_state")
    # Per-tensor scales, as the catalogued file's: per-channel ones put weights at the full int8
    # range, where onnxruntime's u8s8 kernel on CPUs without VNNI saturates.
    quantize_dynamic(str(float_onnx), str(folder / "model.onnx"),
                     weight_type=QuantType.QInt8, per_channel=False)
    spec = _save_spec(folder, ModelSpec(
        name="tiny-colbert", role="teacher", format="onnx", path="model.onnx",
        scoring="late_interaction", max_query_length=32, max_passage_length=max_passage_length,
        dim=32, licence="test-only", source="tests/tiny_colbert.py (random weights, seed 6)",
    ))
    return spec, float_onnx
