"""Two-process CPU (gloo) training with nbzoo.train.fit, launched by torchrun; each rank writes
its final weight digest and loss history to OUT/rank<R>.json."""

import hashlib
import json
import sys

import torch

from nbzoo import device
from nbzoo.train import TrainConfig, fit

out = sys.argv[1]
rt = device.setup("cpu", "fp32", seed=0)
g = torch.Generator().manual_seed(0)
x = torch.randn(256, 8, generator=g)
y = (x[:, 0] - 2 * x[:, 1] > 0).long()
data = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def loss_fn(m, batch):
    return torch.nn.functional.cross_entropy(m(batch["x"]), batch["labels"])


result = fit(
    model,
    data,
    torch.optim.SGD(model.parameters(), lr=0.2),
    rt,
    TrainConfig(epochs=3, batch_size=16),
    loss_fn=loss_fn,
)
digest = hashlib.sha256(
    b"".join(p.detach().numpy().tobytes() for p in model.parameters())
).hexdigest()
with open(f"{out}/rank{rt.rank}.json", "w") as f:
    json.dump(
        {
            "digest": digest,
            "world": rt.world_size,
            "losses": [h["loss"] for h in result.history],
            "samples": result.samples,
        },
        f,
    )
