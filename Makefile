# Equivalent to the README's two commands.
.PHONY: run test
run:
	python3 dev.py run
test:
	python3 dev.py test
