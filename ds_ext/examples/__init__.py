"""Runnable examples shipped with the package: ``python -m ds_ext.examples.hf_trainer`` (a Hugging Face Trainer
with a ds_ext method; launch it with ``deepspeed --num_gpus 2 --module ds_ext.examples.hf_trainer`` or
``accelerate launch --use_deepspeed --num_processes 2 -m ds_ext.examples.hf_trainer``)."""
