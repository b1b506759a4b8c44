"""Models elbokit trains: an MLP VAE with a Gaussian encoder."""

from .vae import VAE

__all__ = ["VAE"]
