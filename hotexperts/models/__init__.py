"""hotexperts.models"""
