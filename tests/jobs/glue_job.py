"""A small SST-2 fine-tuning run for the resume test; prints its dev metrics and a weight digest.

Usage: python glue_job.py WORKDIR [KILL_AT_STEP]
"""

import hashlib
import json
import os
import signal
import sys

from nbzoo import device, finetune, presets

workdir, kill_at = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0
names = {k: None for k in presets.load("01_albert_glue")["demo"]}
names.update(
    seed=0,
    data_dir=f"{workdir}/dataset",
    checkpoint_dir=f"{workdir}/checkpoints",
    epochs=2,
    sample_sizes={"train": 320, "dev": 100},
    checkpoint_every=3,
)
# Dropout on, so that the resumed run must also restore the RNG state to match.
names["model_config"] = {
    **presets.load("01_albert_glue")["demo"]["model_config"],
    "hidden_dropout_prob": 0.1,
}
cfg = presets.resolve("01_albert_glue", "demo", names)
rt = device.setup("cpu", "fp32", 0)

if kill_at:
    import nbzoo.train as train

    original_fit = train.fit

    def fit_then_die(*args, **kwargs):
        def die(step, loss, state):
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        kwargs["callbacks"] = [die]
        return original_fit(*args, **kwargs)

    finetune.fit = fit_then_die

out = finetune.finetune_glue("sst2", cfg, rt)
digest = hashlib.sha256(
    b"".join(p.detach().numpy().tobytes() for p in out.model.parameters())
).hexdigest()
print(
    json.dumps(
        {
            "metrics": out.metrics,
            "digest": digest,
            "resumed_from": out.result.resumed_from_step,
            "steps": out.result.steps,
            "final_loss": out.result.final_loss,
        }
    )
)
