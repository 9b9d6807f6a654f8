"""Storage: the service's database (:mod:`.database`) and one repository per concept stored in it."""
