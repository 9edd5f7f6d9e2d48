"""An ordinary single-device fine-tuning loop, like the reference workloads' script, plus the
one line. Usage: python plain_script.py MODEL_DIR (alone, or under torchrun)."""

import os
import sys

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

import finetune_trainer

finetune_trainer.enable_advanced_parallelization()

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
device = "cuda" if torch.cuda.is_available() else "cpu"
model.to(device)
model.train()

g = torch.Generator().manual_seed(3)
samples = [{"input_ids": torch.randint(3, 32000, (32,), generator=g)} for _ in range(32)]
for s in samples:
    s["attention_mask"] = torch.ones_like(s["input_ids"])
    s["labels"] = s["input_ids"].clone()
loader = DataLoader(samples, batch_size=8, shuffle=False, drop_last=True)
optim = torch.optim.AdamW(model.parameters(), lr=1e-3)

for step, batch in enumerate(loader):
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        labels=batch["labels"].to(device),
        use_cache=False,
    )
    out.loss.backward()
    optim.step()
    model.zero_grad(set_to_none=True)
    print(f"loss {os.environ.get('RANK', '0')} {step} {out.loss.item():.8f}", flush=True)
