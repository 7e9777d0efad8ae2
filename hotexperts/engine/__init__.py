"""hotexperts.engine"""
