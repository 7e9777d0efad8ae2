"""hotexperts.server"""
