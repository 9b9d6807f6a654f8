"""HTTP layer: parse, call one domain function, shape the response."""
