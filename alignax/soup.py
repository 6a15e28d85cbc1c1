"""`python -m alignax.soup --workdirs=A,B[,C] --lambdas=0,0.25,0.5,0.75,1 --out=DIR`: rewarded soups.

The implementation and its documentation are in `alignax/study/soup.py`.
"""

from alignax.study.soup import cli, make_soups, mix_trees, write_soup

__all__ = ["cli", "make_soups", "mix_trees", "write_soup"]

if __name__ == "__main__":
    cli()
