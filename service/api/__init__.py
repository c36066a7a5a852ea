"""The HTTP API: dependencies, error mapping, the OpenAPI document and one router per resource."""
