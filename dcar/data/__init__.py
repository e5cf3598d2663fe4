"""Datasets: procedural shapes, ImageFolder, JSONL and webdataset image-caption data; resumable sampling."""
