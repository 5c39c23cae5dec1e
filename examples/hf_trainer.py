# Hugging Face Trainer drives the remote model; Kill and Revive rides along as a callback.
import os

from peft import LoraConfig
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from edge_client import DLoRAModelForCausalLM, KillRevive, KRConfig

server = os.environ.get("DLORA_SERVER", "127.0.0.1:50551")
model = DLoRAModelForCausalLM.connect(server, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05))
texts = ["The match ended two nil. Topic: sport", "Shares fell after the report. Topic: business",
         "A new phone was unveiled. Topic: tech", "The minister called a vote. Topic: politics"]
rows = [model.tokenizer(t) for t in texts]

kill_revive = KillRevive(model, KRConfig(policy="kr", unit="site", warmup_steps=2, period=2))
args = TrainingArguments("runs/trainer", max_steps=4, per_device_train_batch_size=2, learning_rate=2e-3,
                         report_to=[], save_strategy="no", use_cpu=True)
trainer = Trainer(model=model, args=args, train_dataset=rows,
                  data_collator=DataCollatorForLanguageModeling(model.tokenizer, mlm=False),
                  callbacks=[kill_revive.callback()])
trainer.train()
model.save_pretrained("runs/trainer/adapters")
prompt = model.tokenizer("The match ended", return_tensors="pt")
print(model.tokenizer.decode(model.generate(**prompt, max_new_tokens=8)[0]))   # greedy, on the cloud's KV cache
model.close()
