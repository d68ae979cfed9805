"""The API's routes, one module per resource: searches (`search`), clips and their audio
(`clips`), the service's state and index version (`service`), and the web page (`page`).
Each module has one `router`; `gpa_ray.serve.api.create_api` includes them all."""
