"""Projector, proprio projector and the L1-regression action head (names = official checkpoint keys)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class FusedMLPProjector(nn.Module):
    """`projector.*`: vision_dim -> 4*vision_dim -> llm_dim -> llm_dim, GELU after fc1 and fc2."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x):  # x: [B, N, vision_dim] -> [B, N, llm_dim]
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class ProprioProjector(nn.Module):
    """`proprio_projector--*.pt` (keys `module.fc1|fc2`): proprio [B, 8] -> one token [B, llm_dim]."""

    def __init__(self, llm_dim: int, proprio_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class MLPResNetBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x):
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.mlp_resnet_blocks = nn.ModuleList(MLPResNetBlock(hidden_dim) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x):
        x = F.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionActionHead(nn.Module):
    """`action_head--*.pt` (keys `module.model.*`): 56 hidden states -> [B, 8, 7] normalized actions."""

    def __init__(self, llm_dim: int, action_dim: int, chunk: int):
        super().__init__()
        self.chunk = chunk
        self.model = MLPResNet(2, llm_dim * action_dim, llm_dim, action_dim)

    def forward(self, action_hidden):  # [B, chunk*action_dim, D] -> [B, chunk, action_dim]
        B = action_hidden.shape[0]
        return self.model(action_hidden.reshape(B, self.chunk, -1))
