"""Optional integrations with Captum, Quantus and Hugging Face transformers (imported lazily)."""
