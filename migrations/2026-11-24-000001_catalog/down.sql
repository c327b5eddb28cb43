DROP TABLE product_photos;
DROP TABLE products;
