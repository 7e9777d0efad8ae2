"""hotexperts.bench"""
