# A plain PyTorch loop on the remote model: your data, your loss, any torch optimizer.
import os

import torch
from peft import LoraConfig

from edge_client import DLoRAModelForCausalLM, KillRevive, KRConfig

server = os.environ.get("DLORA_SERVER", "127.0.0.1:50551")
model = DLoRAModelForCausalLM.connect(server, LoraConfig(r=8, lora_alpha=16))
texts = ["The match ended two nil. Topic: sport", "Shares fell after the report. Topic: business"]
batch = model.tokenizer(texts, return_tensors="pt", padding=True)
labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
kill_revive = KillRevive(model, KRConfig(policy="kr", unit="site", warmup_steps=2, period=2))
for step in range(4):
    for half in (slice(0, 1), slice(1, 2)):          # gradient accumulation: two micro-batches
        out = model(batch["input_ids"][half], batch["attention_mask"][half], labels=labels[half])
        (out.loss / 2).backward()                    # drives the cloud's backward
    optimizer.step()
    optimizer.zero_grad()
    kill_revive.step()                               # parks the least-moving sites on the cloud
    print(f"step {step + 1}: loss {out.loss.item():.3f}, {len(kill_revive.live)} modules live")

model.save_pretrained("my-adapters")                 # PEFT's layout
model.close()
