.PHONY: test test-slow test-all quality style demo demo-t2i

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

demo-t2i:
	python examples/demo_t2i.py --output_dir demo-t2i-report
