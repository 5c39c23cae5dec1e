# TRL's SFTTrainer drives the remote model on prompt/completion pairs (the loss on the completions only).
import os

from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from edge_client import DLoRAModelForCausalLM

server = os.environ.get("DLORA_SERVER", "127.0.0.1:50551")
model = DLoRAModelForCausalLM.connect(server, LoraConfig(r=8, lora_alpha=16))
pairs = [("The match ended two nil. Topic:", " sport"), ("Shares fell after the report. Topic:", " business"),
         ("A new phone was unveiled. Topic:", " tech"), ("The minister called a vote. Topic:", " politics")]
data = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs])
# No gradient checkpointing: the blocks and their activations are on the cloud.
args = SFTConfig("runs/sft", max_steps=4, per_device_train_batch_size=2, learning_rate=2e-3, report_to=[],
                 save_strategy="no", use_cpu=True, gradient_checkpointing=False)
SFTTrainer(model=model, args=args, train_dataset=data, processing_class=model.tokenizer).train()
model.save_pretrained("runs/sft/adapters")   # PEFT's layout
model.close()
