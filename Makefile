.PHONY: test test-slow test-all quality style demo

test:
	python -m pytest -q

test-slow:
	python -m pytest -q -m slow

test-all:
	python -m pytest -q -m ""

quality:
	ruff check src tests examples benchmarks
	ruff format --check src tests examples benchmarks

style:
	ruff check --fix src tests examples benchmarks
	ruff format src tests examples benchmarks

demo:
	python examples/demo.py --output_dir demo-report
