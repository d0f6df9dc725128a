"""Glue between hf_eff's methods and the Hugging Face libraries they plug into."""
