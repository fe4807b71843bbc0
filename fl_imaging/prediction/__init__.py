"""Applying a trained model to a folder of images, with saliency maps."""
