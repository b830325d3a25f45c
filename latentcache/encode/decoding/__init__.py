"""Decoding videos and images into clips: PyAV opening, probing, the decode loop, frames picked by time, damage
checks, and the workers that decode ahead of the VAE. Nothing here imports a model."""
