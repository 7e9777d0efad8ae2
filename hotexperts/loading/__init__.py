"""hotexperts.loading"""
