"""MemControl: search which UNet blocks get parameter-efficient updates so fine-tuning a
text-to-image diffusion model on sensitive images memorizes less at good quality."""

__version__ = "0.1.0"
