"""hotexperts.trace"""
