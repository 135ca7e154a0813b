"""What runs one volume: the wiring of the layers, the FUSE loop, and the control protocol."""
