"""hotexperts.kernels"""
