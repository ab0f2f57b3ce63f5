"""The README's library example runs as written (with a small model, loader and loss supplied)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


class MyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


def test_readme_library_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text.split("## Use it in your own training loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    loader = [(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]
    ns = {"MyModel": MyModel, "loader": loader, "criterion": nn.CrossEntropyLoss()}
    exec(compile(code, "README.md", "exec"), ns)
    model = ns["model"]
    assert set(ns["calib"]) == {"conv", "fc"}  # "head" excluded, as the config says
    assert isinstance(model.head, nn.Linear)
    assert (tmp_path / "model.onnx").stat().st_size > 0
