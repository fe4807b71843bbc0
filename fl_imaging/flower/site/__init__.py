"""A site's side of the Flower apps: ClientApp, its gate, queries and outgoing update."""
